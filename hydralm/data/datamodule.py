"""LightningDataModule for the synthetic tasks (retrieval_qa, mqar, needle).

Nothing is stored: ``num_train_samples`` may be 10**9, a sample is generated when its index is
drawn. DDP sharding and the resumable position come from ``ResumableDataModule``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
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


class CurriculumDataset(SyntheticDataset):
    """The train split of a curriculum: the sample at global position ``i`` comes from the phase ``i`` falls in.

    ``phases`` is ``[(end, task), ...]`` with increasing ``end`` (first position past the phase); positions
    past the last phase use ``task``. A phase ends on a step boundary (``end = until_step * global batch``),
    so a batch never mixes lengths, and a resumed run regenerates the same phase for the same position.
    """

    def __init__(self, phases: list[tuple[int, SyntheticTask]], task: SyntheticTask, split: str, num_samples: int,
                 seed: int = 0) -> None:
        super().__init__(task, split, num_samples, seed)
        self.phases = phases

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for end, task in self.phases:
            if index < end and 0 <= index < self.num_samples:
                return task.sample(int(index), self.split, self.seed)
        return super().__getitem__(index)


def build_curriculum(task: SyntheticTask | str, task_kwargs: Mapping[str, Any] | None,
                     curriculum: Sequence[Mapping[str, Any]] | None) -> list[tuple[int, SyntheticTask]]:
    """``[(until_step, task), ...]`` from ``[{until_step: 200, seq_len: 1024, ...}, ...]`` (task_kwargs overrides)."""
    if not curriculum:
        return []
    if isinstance(task, SyntheticTask):
        raise ValueError("curriculum needs the task given by name (its phases override task_kwargs)")
    phases, previous = [], 0
    for i, phase in enumerate(curriculum):
        phase = dict(phase)
        until = phase.pop("until_step", None)
        if isinstance(until, bool) or not isinstance(until, int) or until <= previous:
            raise ValueError(f"curriculum[{i}].until_step={until!r} must be an int > {previous} (phases in order)")
        try:
            phases.append((until, build_task(task, {**dict(task_kwargs or {}), **phase})))
        except ValueError as err:  # name the phase: its fields are mixed from task_kwargs and the phase
            raise ValueError(f"curriculum[{i}] (task_kwargs overridden by {phase}): {err}") from None
        previous = until
    return phases


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
        curriculum: optional training phases before the configured task, e.g.
            ``[{until_step: 200, seq_len: 1024, num_kv_pairs: 32}, {until_step: 400, seq_len: 4096}]``:
            steps < 200 train on the first overrides of ``task_kwargs``, steps 200-399 on the second, later
            steps (and val/test, always) on ``task_kwargs`` itself. Phases follow the global sample position,
            so they need ``shuffle=false``; a resumed run continues in the right phase.
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
        curriculum: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        for name, value in (
            ("num_train_samples", num_train_samples),
            ("num_val_samples", num_val_samples),
            ("num_test_samples", num_test_samples),
        ):
            check_positive_int(type(self).__name__, name, value)
        self.task = build_task(task, task_kwargs)
        self.curriculum = build_curriculum(task, task_kwargs, curriculum)
        if self.curriculum and shuffle:
            raise ValueError("curriculum phases follow the sample position: set shuffle=false (data.shuffle=false)")
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
        phases = "".join(f" until_step={end}: {task!r}" for end, task in self.curriculum)
        return (f"{self.task!r} seed={self.seed} num_train_samples={self.num_train_samples} shuffle={self.shuffle}"
                + (f" curriculum:{phases}" if phases else ""))

    def task_settings(self) -> dict[str, Any]:
        """What the model is trained and validated on (the task after any curriculum), as plain values:
        ``{"name": "retrieval_qa", "seq_len": 128, ..., "vocab_size": 64}``. Saved in checkpoints, so
        ``evaluate.py`` can measure the task the model was trained on."""
        settings: dict[str, Any] = {"name": self.task.name}
        for field in dataclasses.fields(self.task):  # type: ignore[arg-type]  # every task is a dataclass
            value = getattr(self.task, field.name)
            if value is None or isinstance(value, (bool, int, float, str)):
                settings[field.name] = value
        settings["vocab_size"] = self.task.vocab_size
        return settings

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "task": self.task_settings()}

    def dataset(self, split: str) -> SyntheticDataset:
        sizes = {"train": self.num_train_samples, "val": self.num_val_samples, "test": self.num_test_samples}
        return SyntheticDataset(self.task, split, sizes[split], self.seed)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        if self.curriculum:
            _, world = self.rank_and_world()
            global_batch = self.batch_size * world
            phases = [(until * global_batch, task) for until, task in self.curriculum]
            dataset = CurriculumDataset(phases, self.task, "train", self.num_train_samples, self.seed)
        return self.make_loader(dataset, self.train_sampler(len(dataset), self.shuffle), train=True)

    def val_dataloader(self) -> DataLoader:
        dataset = self.dataset("val")
        return self.make_loader(dataset, self.eval_sampler(len(dataset)), train=False)

    def test_dataloader(self) -> DataLoader:
        dataset = self.dataset("test")
        return self.make_loader(dataset, self.eval_sampler(len(dataset)), train=False)
