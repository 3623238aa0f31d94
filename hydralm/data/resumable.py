"""Data position that survives a checkpoint: the base of every HydraLM DataModule.

How Lightning 2.6 resumes, and why this design is exact:

* ``Trainer.fit(ckpt_path=...)`` calls ``datamodule.load_state_dict(checkpoint[<class name>])``
  (``_CheckpointConnector.restore_datamodule``) *before* the fit loop builds the train loader
  (``FitLoop.setup_data`` -> ``train_dataloader()``), so the restored position is known when the
  sampler is made.
* Lightning itself does not fast-forward a map-style loader: resuming mid-epoch it iterates the
  new loader from its first batch (and only warns), while its in-epoch batch counter continues
  from the checkpoint. So the loader must start where the data stopped - our sampler skips the
  consumed part of the epoch but keeps the full epoch length (see ``sampler.py``).
* The position is counted where a batch is handed to the training step
  (``on_before_batch_transfer``, training stage only), not in the sampler or dataset: DataLoader
  workers and Lightning's one-batch prefetch run ahead of training, so counting there would
  skip batches that were fetched but never trained on.

The counter is in *samples of the global stream* (per-rank rows x world_size), so a resume with a
different number of GPUs or per-GPU batch still continues the same stream exactly.

Caveat: Lightning routes ``on_before_batch_transfer`` to the DataModule when it defines it; a
LightningModule that also overrides it gets a Lightning warning and is bypassed.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from hydralm.data.sampler import ResumableDistributedSampler
from hydralm.data.synthetic import check_positive_int


class PositionedDataLoader(DataLoader):
    """A DataLoader whose start position was set by its DataModule's restored state.

    Its own ``state_dict`` is empty (the position lives in the DataModule's state, restored before
    the loader is built); having one tells Lightning the loader is resumable, which silences its
    "dataloader is not resumable" warning on mid-epoch resume - a warning that would be false here.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class ResumableDataModule(L.LightningDataModule):
    """Base DataModule: owns the data position; subclasses provide datasets and ``data_fingerprint``."""

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_int(owner, "batch_size", batch_size)
        check_positive_int(owner, "num_workers", num_workers, minimum=0)
        check_positive_int(owner, "seed", seed, minimum=0)
        self.batch_size, self.num_workers, self.seed, self.pin_memory = batch_size, num_workers, seed, pin_memory
        self._epoch = 0  # epoch the position below belongs to
        self._consumed = 0  # global-stream samples of that epoch already trained on

    # -- identity of the data, so a checkpoint's position is never applied to other data ------
    def data_fingerprint(self) -> str:
        raise NotImplementedError

    # -- distributed context -------------------------------------------------------------------
    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # -- position tracking ---------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self._epoch:
                self._epoch, self._consumed = trainer.current_epoch, 0
            self._consumed += int(batch["input_ids"].shape[0]) * trainer.world_size
        return batch

    @property
    def samples_consumed(self) -> int:
        return self._consumed

    def state_dict(self) -> dict[str, Any]:
        # Plain ints/strs only: the checkpoint must load with torch.load(weights_only=True).
        return {"epoch": self._epoch, "samples_consumed": self._consumed, "fingerprint": self.data_fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("fingerprint")
        if saved is not None and saved != self.data_fingerprint():
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's data position belongs to different data "
                f"({saved}); this data ({self.data_fingerprint()}) starts from its beginning"
            )
            self._epoch, self._consumed = 0, 0
            return
        self._epoch = int(state_dict.get("epoch", 0))
        self._consumed = int(state_dict.get("samples_consumed", 0))

    # -- loaders -------------------------------------------------------------------------------
    def epoch_for_new_loader(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else self._epoch

    def train_sampler(self, num_samples: int, shuffle: bool) -> ResumableDistributedSampler:
        rank, world = self.rank_and_world()
        if num_samples // world < self.batch_size:
            # drop_last would otherwise make an epoch of zero steps, which trains on nothing, silently.
            raise ValueError(
                f"{type(self).__name__}: the train split has {num_samples} samples, fewer than one global batch "
                f"(batch_size={self.batch_size} x world_size={world}); lower batch_size or add data"
            )
        epoch, start = self._epoch, self._consumed
        if start and start >= self._epoch_capacity(num_samples, world):
            # Checkpoint taken on the epoch's last batch: Lightning resumes in the next epoch, but a
            # multi-worker loader draws its first indices *before* Lightning calls set_epoch, so the
            # sampler must already be on the next epoch when it is built.
            epoch, start = epoch + 1, 0
        return ResumableDistributedSampler(
            num_samples, rank, world, shuffle=shuffle, seed=self.seed, start=start, start_epoch=epoch
        )

    def _epoch_capacity(self, num_samples: int, world: int) -> int:
        """Global samples one epoch trains on (full batches, capped like Lightning's limit_train_batches)."""
        batches = num_samples // world // self.batch_size
        limit = self.trainer.limit_train_batches if self.trainer is not None else 1.0
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif isinstance(limit, float):
            batches = int(batches * limit)
        return batches * self.batch_size * world

    def eval_sampler(self, num_samples: int) -> ResumableDistributedSampler:
        rank, world = self.rank_and_world()
        return ResumableDistributedSampler(num_samples, rank, world, shuffle=False, seed=self.seed)

    def make_loader(self, dataset: Dataset, sampler: ResumableDistributedSampler | None, train: bool) -> DataLoader:
        return PositionedDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Full batches in training keep every step the same global batch (and DDP ranks in step).
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
