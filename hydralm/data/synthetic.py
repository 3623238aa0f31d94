"""What every synthetic task shares: random access by index, disjoint splits, the batch format.

Sample ``i`` of split ``s`` is a pure function of ``(seed, s, i)``: nothing is stored, any index can
be generated in any order, by any DataLoader worker or DDP rank, and a resumed run regenerates
exactly the samples it would have seen.

Splits are *strictly* disjoint, not just "different seeds": a candidate sequence belongs to the split
``hash(input_ids) % 3`` (train=0, val=1, test=2) and a generator keeps drawing candidates
(``attempt = 0, 1, ...``) until one falls in its own split. Independent seeds alone would leave a
real overlap for small configs (e.g. MQAR with a tiny vocabulary, where the sample space is small);
the hash partition rules it out for every config, at ~3 candidate draws per sample.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from hydralm.data.vocab import FACT_ID, QUERY_ID, SyntheticVocab

IGNORE_INDEX = -100
SPLITS = {"train": 0, "val": 1, "test": 2}
# (2/3)**64 ~ 5e-12: hitting this means the sample space is degenerate, not bad luck.
MAX_SPLIT_ATTEMPTS = 64


def split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {sorted(SPLITS)}")
    return SPLITS[split]


def content_split(input_ids: np.ndarray) -> int:
    """Split a sequence belongs to, from its content alone (so identical sequences agree)."""
    digest = hashlib.blake2b(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % len(SPLITS)


def check_positive_int(owner: str, name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name}={value!r} must be an int >= {minimum}")


class SyntheticTask:
    """Base class. Subclasses are dataclasses with ``seq_len``, ``vocab`` and ``loss_on_all``,
    expose ``num_queries`` and implement ``_generate(rng)``."""

    name: ClassVar[str] = "synthetic"
    seq_len: int
    num_queries: int  # fixed per config so batches stack
    vocab: SyntheticVocab
    loss_on_all: bool

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    def _generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(tokens (N,), answer_positions (Q,), answers (Q,), depths (Q,), sources (Q,))``, where the
        model's prediction at ``answer_positions[q]`` must be ``answers[q]`` (== ``tokens[pos + 1]``) and
        ``sources[q]`` is the position of that answer in the context (the fact's value token): the token the
        model has to recall, so routing can be checked against it (hydralm/eval/routing_recall.py)."""
        raise NotImplementedError

    def sample(self, index: int, split: str = "train", seed: int = 0) -> dict[str, torch.Tensor]:
        """The sample ``index`` of ``split``; same arguments, same tensors, on any machine."""
        sid = split_id(split)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index={index!r} must be an int >= 0")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an int >= 0")
        for attempt in range(MAX_SPLIT_ATTEMPTS):
            rng = np.random.default_rng([int(seed), sid, int(index), attempt])
            tokens, positions, answers, depths, sources = self._generate(rng)
            if content_split(tokens) == sid:
                return self._to_batch_item(tokens, positions, answers, depths, sources)
        raise RuntimeError(
            f"{type(self).__name__}: no sample of split {split!r} in {MAX_SPLIT_ATTEMPTS} draws; the sample space of "
            "this config is too small to hold three disjoint splits (increase vocab or seq_len)"
        )

    def _to_batch_item(self, tokens, positions, answers, depths, sources) -> dict[str, torch.Tensor]:
        order = np.argsort(positions, kind="stable")
        positions, answers, depths, sources = positions[order], answers[order], depths[order], sources[order]
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        if self.loss_on_all:
            labels[:-1] = tokens[1:]
        labels[positions] = answers
        return {
            "input_ids": torch.from_numpy(tokens.astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "query_positions": torch.from_numpy(positions.astype(np.int64)),
            "depths": torch.from_numpy(depths.astype(np.float32)),
            "source_positions": torch.from_numpy(np.asarray(sources, dtype=np.int64)),
        }


class SyntheticDataset(Dataset):
    """Map-style view of ``num_samples`` indices of one split; samples are made on access."""

    def __init__(self, task: SyntheticTask, split: str, num_samples: int, seed: int = 0) -> None:
        split_id(split)
        check_positive_int("SyntheticDataset", "num_samples", num_samples)
        self.task, self.split, self.num_samples, self.seed = task, split, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} {self.split} samples")
        return self.task.sample(int(index), self.split, self.seed)


# ---------------------------------------------------------------------------------------------
# Building blocks used by the task generators.


def filler(rng: np.random.Generator, vocab: SyntheticVocab, length: int) -> np.ndarray:
    """I.i.d. filler tokens: carry no information, so the only way to answer is to recall a fact."""
    return rng.integers(vocab.filler_start, vocab.vocab_size, size=length, dtype=np.int64)


def distinct_keys(rng: np.random.Generator, vocab: SyntheticVocab, count: int, key_len: int) -> np.ndarray:
    """``count`` distinct keys of ``key_len`` key tokens each, shape ``(count, key_len)``."""
    space = vocab.num_keys**key_len  # Python int: exact even when it exceeds int64
    if space < 4 * count:
        # Dense regime: rejection would loop a lot, so draw codes without replacement and decode.
        codes = rng.choice(space, size=count, replace=False)
        digits = np.stack([(codes // vocab.num_keys**p) % vocab.num_keys for p in range(key_len)], axis=1)
        return digits.astype(np.int64) + vocab.key_start
    rows: list[np.ndarray] = []
    seen: set[tuple[int, ...]] = set()
    while len(rows) < count:
        for row in rng.integers(0, vocab.num_keys, size=(count, key_len), dtype=np.int64):
            key = tuple(row.tolist())
            if key not in seen:
                seen.add(key)
                rows.append(row)
                if len(rows) == count:
                    break
    return np.stack(rows) + vocab.key_start


def fact_tokens(marker: int, key: np.ndarray, value: int) -> np.ndarray:
    """``[marker, key..., value]``: the same shape for a fact (``FACT``) and its query (``QUERY``)."""
    return np.concatenate([[marker], key, [value]]).astype(np.int64)


__all__ = [
    "FACT_ID",
    "IGNORE_INDEX",
    "QUERY_ID",
    "SPLITS",
    "SyntheticDataset",
    "SyntheticTask",
    "content_split",
]
