"""Measurements behind the FactBank claims (C3, C9; docs/claims.md), for the claim suite and the tests.

C3: write -> query round trip returns the written values (cosine >= 1 - 1e-6).
C9: after 10x rotations of a capacity-K bank, precision@1 on the newest 10% of keys >= 0.95.

Each function returns the measured number; the threshold comparison belongs to the caller.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from hydralm.factbank.factbank import FactBank

C3_THRESHOLD = 1 - 1e-6  # min cosine(returned value, written value)
C9_THRESHOLD = 0.95  # precision@1 on the newest 10% after 10 rotations


def measure_c3(
    dims: Sequence[int] = (16, 64, 256),
    num_facts: int = 256,
    value_dim: int = 32,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Write ``num_facts`` random (key, value) pairs into a bank that holds them all, query every key once
    (top-1), and return the smallest cosine between a returned value and the value written with its key,
    over every key dimension in ``dims``."""
    generator = torch.Generator().manual_seed(seed)
    worst = 1.0
    for dim in dims:
        keys = torch.randn(num_facts, dim, generator=generator)
        values = torch.randn(num_facts, value_dim, generator=generator)
        bank = FactBank(dim, capacity=num_facts, device=device, dtype=dtype)
        bank.write(keys, values)
        got, _ = bank.query(keys, k=1)
        cosine = F.cosine_similarity(got[:, 0].double().cpu(), values.double(), dim=-1)
        worst = min(worst, float(cosine.min()))
    return worst


def measure_c9(
    capacity: int = 1024,
    dim: int = 64,
    value_dim: int = 16,
    rotations: int = 10,
    newest_fraction: float = 0.1,
    write_batch: int = 1,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Write ``rotations * capacity`` random pairs in sequence, ``write_batch`` at a time (the ring wraps
    ``rotations`` times), then query the newest ``newest_fraction`` of the keys and return precision@1: the
    share of queries whose top-1 value is exactly the value written with that key."""
    if not 0.0 < newest_fraction <= 1.0:
        raise ValueError(f"measure_c9: newest_fraction={newest_fraction!r} is invalid: expected a number in (0, 1]")
    generator = torch.Generator().manual_seed(seed)
    total = rotations * capacity
    keys = torch.randn(total, dim, generator=generator)
    values = torch.randn(total, value_dim, generator=generator)
    bank = FactBank(dim, capacity, device=device, dtype=dtype)
    for start in range(0, total, write_batch):
        bank.write(keys[start : start + write_batch], values[start : start + write_batch])
    newest = max(1, int(round(newest_fraction * capacity)))
    got, _ = bank.query(keys[-newest:], k=1)
    expected = values[-newest:].to(got.device, got.dtype)
    return float((got[:, 0] == expected).all(dim=-1).float().mean())
