"""A rank-sharded sampler that can start an epoch part-way through, for exact resume.

Why a ``DistributedSampler`` subclass: Lightning (``use_distributed_sampler=True``, the default)
replaces a map-style loader's sampler under DDP unless it already *is* a ``DistributedSampler``;
any other sampler gets wrapped in ``DistributedSamplerWrapper``, which would re-shuffle our order
and materialise every index. Subclassing keeps Lightning's hands off and leaves sharding to us.

Order of one epoch (the "global stream"): ``0..N-1``, or a permutation seeded by ``(seed, epoch)``
when ``shuffle``. The stream does not depend on the number of ranks. Rank ``r`` of ``W`` takes
stream positions ``start + r, start + r + W, start + r + 2W, ...``, so one optimizer step of a
per-rank batch ``B`` consumes the contiguous block of ``B*W`` positions, ranks never share an index,
and skipping ``start`` positions resumes the stream exactly, even with a different ``W``.

``len()`` stays the full epoch's per-rank length even when starting part-way through: Lightning
restores its in-epoch batch counter from the checkpoint and ends the epoch when that counter
reaches ``len(dataloader)``, so a shortened length would end a resumed epoch early.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """Shards ``num_samples`` indices over ``world_size`` ranks without duplicates.

    ``start`` global stream positions of epoch ``start_epoch`` are skipped (data already trained
    on); other epochs start from 0. The ``N % world_size`` tail of the stream is dropped so that
    every rank has the same length (DDP ranks must step together) and nothing is duplicated.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        start: int = 0,
        start_epoch: int = 0,
    ) -> None:
        # Deliberately no super().__init__: it requires a dataset and an initialised process group.
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"start={start} must be >= 0")
        self.total = num_samples
        self.rank, self.num_replicas = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.drop_last = True
        self.start, self.start_epoch = start, start_epoch
        self.epoch = start_epoch
        self.num_samples = num_samples // world_size  # per rank; DistributedSampler's name for it
        self.total_size = self.num_samples * world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def stream(self, epoch: int) -> np.ndarray | range:
        """The global order of epoch ``epoch`` (before sharding)."""
        if not self.shuffle:
            return range(self.total_size)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.total)
        return order[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        start = min(self.start if self.epoch == self.start_epoch else 0, self.total_size)
        # Same count on every rank, even when ``start`` is not a multiple of world_size (a resume
        # on a different number of ranks): ranks that step together must run out together.
        per_rank = (self.total_size - start) // self.num_replicas
        order = self.stream(self.epoch)
        for i in range(per_rank):
            yield int(order[start + self.rank + i * self.num_replicas])
