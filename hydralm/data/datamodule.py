"""LightningDataModule for the synthetic tasks (retrieval_qa, mqar, needle).

Nothing is stored: ``num_train_samples`` may be 10**9, a sample is generated when its index is
drawn. DDP sharding and the resumable position come from ``ResumableDataModule``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import DataLoader

from hydralm.data.mqar import MQAR
from hydralm.data.needle import Needle
from hydralm.data.resumable import ResumableDataModule
from hydralm.data.retrieval_qa import RetrievalQA
from hydralm.data.synthetic import SyntheticDataset, SyntheticTask, check_positive_int
from hydralm.data.vocab import PAD_ID

TASKS: dict[str, type[SyntheticTask]] = {"retrieval_qa": RetrievalQA, "mqar": MQAR, "needle": Needle}


def build_task(task: SyntheticTask | str, task_kwargs: Mapping[str, Any] | None = None) -> SyntheticTask:
    if isinstance(task, SyntheticTask):
        if task_kwargs:
            raise ValueError("task_kwargs is only for a task given by name; configure the task object instead")
        return task
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be a SyntheticTask or one of {sorted(TASKS)}")
    return TASKS[task](**dict(task_kwargs or {}))


class SyntheticDataModule(ResumableDataModule):
    """Train/val/test loaders over one synthetic task.

    Args:
        task: a task object (``RetrievalQA(...)``, ``MQAR(...)``, ``Needle(...)``) or its name, with
            ``task_kwargs`` as constructor arguments.
        batch_size: rows per rank per step (the global batch is ``batch_size * world_size``).
        num_train_samples / num_val_samples / num_test_samples: indices per split.
        shuffle: permute train indices per epoch. Off by default: samples are already i.i.d. by
            index, and an ordered stream needs no O(N) permutation for a huge ``num_train_samples``.
        seed: selects the samples (and the shuffle order); same seed, same data.
    """

    def __init__(
        self,
        task: SyntheticTask | str = "retrieval_qa",
        task_kwargs: Mapping[str, Any] | None = None,
        batch_size: int = 8,
        num_train_samples: int = 10**9,
        num_val_samples: int = 256,
        num_test_samples: int = 256,
        shuffle: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        for name, value in (
            ("num_train_samples", num_train_samples),
            ("num_val_samples", num_val_samples),
            ("num_test_samples", num_test_samples),
        ):
            check_positive_int(type(self).__name__, name, value)
        self.task = build_task(task, task_kwargs)
        self.num_train_samples, self.num_val_samples = num_train_samples, num_val_samples
        self.num_test_samples, self.shuffle = num_test_samples, shuffle

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def seq_len(self) -> int:
        return self.task.seq_len

    def data_fingerprint(self) -> str:
        return f"{self.task!r} seed={self.seed} num_train_samples={self.num_train_samples} shuffle={self.shuffle}"

    def dataset(self, split: str) -> SyntheticDataset:
        sizes = {"train": self.num_train_samples, "val": self.num_val_samples, "test": self.num_test_samples}
        return SyntheticDataset(self.task, split, sizes[split], self.seed)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        return self.make_loader(dataset, self.train_sampler(len(dataset), self.shuffle), train=True)

    def val_dataloader(self) -> DataLoader:
        dataset = self.dataset("val")
        return self.make_loader(dataset, self.eval_sampler(len(dataset)), train=False)

    def test_dataloader(self) -> DataLoader:
        dataset = self.dataset("test")
        return self.make_loader(dataset, self.eval_sampler(len(dataset)), train=False)
