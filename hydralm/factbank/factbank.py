"""FactBank: an explicit key-value memory with FIFO rotation and cosine top-k lookup.

The bank is a ring of ``capacity`` slots. ``write`` appends (key, value) pairs in order; once the ring is
full, each new pair overwrites the oldest one. ``query`` ranks the valid slots by cosine similarity to a
query key and returns the best ``k`` values with their scores. Nothing is learned and nothing is
approximate: a query that repeats a stored key finds that key's slot (cosine 1) unless an identical key
was written later (ties go to the newest entry).

Keys are stored L2-normalised (only their direction matters to a cosine), in ``dtype``. Values keep
any trailing shape fixed by the first write; floating values are stored in ``dtype``, integer or bool
values (token ids, flags) keep their own dtype so they come back bit-exact.

``logit_bias`` is the optional hook into generation: when the values are token ids it turns the
retrieved facts into a (m, vocab) additive bias for the next-token logits. See docs/factbank.md for
what it does and does not do.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

STATE_KEYS = ("dim", "capacity", "count", "keys", "values", "serials")


class FactBank:
    def __init__(self, dim: int, capacity: int, device=None, dtype: torch.dtype = torch.float32):
        _check_positive_int("dim", dim)
        _check_positive_int("capacity", capacity)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"FactBank: dtype={dtype!r} is invalid: expected a floating torch dtype (keys are unit vectors)"
            )
        self.dim, self.capacity, self.dtype = dim, capacity, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.clear()

    # -- contents ----------------------------------------------------------------------------------
    def clear(self) -> None:
        """Empty the bank and reset the write counter; the next write may use a new value shape."""
        self.count = 0  # entries ever written since the last clear (monotonic); next slot = count % capacity
        self.keys = torch.zeros(self.capacity, self.dim, device=self.device, dtype=self.dtype)
        self.values: Optional[torch.Tensor] = None  # (capacity, *value_shape), allocated by the first write
        # Serial number (0-based position in the write stream) of the entry in each slot; -1 = empty.
        self.serials = torch.full((self.capacity,), -1, device=self.device, dtype=torch.int64)

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    @property
    def value_shape(self) -> Optional[Tuple[int, ...]]:
        return None if self.values is None else tuple(self.values.shape[1:])

    @property
    def ages(self) -> torch.Tensor:
        """Per-slot age (capacity,) int64: 0 = the newest entry, ``len(self) - 1`` = the oldest, -1 = empty."""
        return torch.where(self.serials >= 0, self.count - 1 - self.serials, torch.full_like(self.serials, -1))

    @property
    def state_bytes(self) -> int:
        """Bytes held by the bank's tensors (allocated for the full capacity, whatever ``len`` is)."""
        tensors = [self.keys, self.serials] + ([self.values] if self.values is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append n pairs: keys (n, dim), values (n, *value_shape). Past capacity the oldest are overwritten;
        if n > capacity only the last ``capacity`` pairs of this write survive (the counter still grows by n)."""
        keys = self._check_keys("keys", keys)
        if not isinstance(values, torch.Tensor) or values.dim() < 1 or values.shape[0] != keys.shape[0]:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"FactBank.write: values must be a tensor (n={keys.shape[0]}, ...), got {shape}")
        if values.is_floating_point() and not torch.isfinite(values).all():
            raise ValueError("FactBank.write: values contain NaN or inf")
        n = keys.shape[0]
        if n == 0:
            return
        values = self._prepare_values(values)
        serials = torch.arange(self.count, self.count + n, device=self.device)
        if n > self.capacity:
            keys, values, serials = keys[-self.capacity :], values[-self.capacity :], serials[-self.capacity :]
        slots = serials % self.capacity
        self.keys.index_copy_(0, slots, F.normalize(keys, dim=-1))
        self.values.index_copy_(0, slots, values)
        self.serials.index_copy_(0, slots, serials)
        self.count += n

    def query(self, keys: torch.Tensor, k: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k by cosine over valid slots: keys (m, dim) -> (values (m, k, *value_shape), scores (m, k)).

        Ranked best first; equal scores go to the newer entry. When the bank holds fewer than k entries the
        missing ranks are padding: score NaN and value NaN (floating values), -1 (signed integers) or 0
        (unsigned / bool) -- ``scores.isnan()`` marks them.
        """
        keys = self._check_keys("keys", keys)
        _check_positive_int("k", k)
        m, found = keys.shape[0], min(k, len(self))
        value_shape = self.value_shape if self.values is not None else ()
        value_dtype = self.values.dtype if self.values is not None else self.dtype
        values = torch.full((m, k, *value_shape), _pad_value(value_dtype), device=self.device, dtype=value_dtype)
        scores = torch.full((m, k), math.nan, device=self.device, dtype=self.dtype)
        if found == 0 or m == 0:
            return values, scores
        # Valid slots, newest first: a stable sort then keeps the newest of equal-score entries in front.
        order = torch.argsort(self.serials, descending=True)[: len(self)]
        sims = F.normalize(keys, dim=-1) @ self.keys[order].T  # (m, valid)
        best, rank = torch.sort(sims, dim=-1, descending=True, stable=True)
        slots = order[rank[:, :found]]
        scores[:, :found] = best[:, :found]
        values[:, :found] = self.values[slots]
        return values, scores

    def logit_bias(
        self, keys: torch.Tensor, vocab_size: int, k: int = 1, strength: float = 5.0, min_score: float = 0.5
    ) -> torch.Tensor:
        """Additive next-token bias from retrieved facts whose values are token ids.

        Returns (m, vocab_size) in ``dtype``: ``bias[i, t] = strength * max(score_j)`` over the top-k entries
        j retrieved for query i with ``score_j >= min_score`` whose value contains token t; 0 elsewhere.
        Negative ids in a value are padding and ignored. Add it to the logits of a decode step.
        """
        _check_positive_int("vocab_size", vocab_size)
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
            raise ValueError(f"FactBank.logit_bias: strength={strength!r} is invalid: expected a finite number")
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0.0 <= min_score <= 1.0:
            raise ValueError(f"FactBank.logit_bias: min_score={min_score!r} is invalid: expected a number in [0, 1]")
        if self.values is not None and (self.values.is_floating_point() or self.values.dtype == torch.bool):
            raise ValueError(
                f"FactBank.logit_bias needs integer token-id values, but the bank holds {self.values.dtype} values"
            )
        values, scores = self.query(keys, k)
        m = values.shape[0]
        if self.values is None:  # nothing written yet: no fact to push
            return torch.zeros(m, vocab_size, device=self.device, dtype=self.dtype)
        ids = values.reshape(m, k, -1).long()  # (m, k, L)
        weight = torch.where(scores >= min_score, scores, torch.zeros_like(scores))  # NaN padding -> 0
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise ValueError(f"FactBank.logit_bias: a stored token id ({int(ids.max())}) is >= vocab_size={vocab_size}")
        weight = weight[:, :, None].expand_as(ids).masked_fill(ids < 0, 0.0)
        bias = torch.zeros(m, vocab_size + 1, device=self.device, dtype=self.dtype)
        # Padding ids (< 0) go to a spare column that is dropped: scatter needs a valid index for every entry.
        bias.scatter_reduce_(
            1,
            ids.masked_fill(ids < 0, vocab_size).flatten(1),
            weight.flatten(1).to(self.dtype),
            reduce="amax",
            include_self=True,
        )
        return strength * bias[:, :vocab_size]

    # -- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain ints and tensors (CPU clones): loads with ``torch.load(..., weights_only=True)``."""
        return {
            "dim": self.dim,
            "capacity": self.capacity,
            "count": self.count,
            "keys": self.keys.detach().cpu().clone(),
            "values": None if self.values is None else self.values.detach().cpu().clone(),
            "serials": self.serials.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` of a bank with the same ``dim`` and ``capacity`` (onto this bank's device)."""
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"FactBank.load_state_dict: expected a dict with keys {list(STATE_KEYS)}, got {got}")
        for name in ("dim", "capacity"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"FactBank.load_state_dict: state {name}={state[name]} does not match this bank's "
                    f"{name}={getattr(self, name)} (use FactBank.from_state_dict to rebuild it)"
                )
        count, keys, serials, values = state["count"], state["keys"], state["serials"], state["values"]
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"FactBank.load_state_dict: count={count!r} is invalid: expected an integer >= 0")
        if tuple(keys.shape) != (self.capacity, self.dim) or tuple(serials.shape) != (self.capacity,):
            raise ValueError(
                f"FactBank.load_state_dict: keys {tuple(keys.shape)} / serials {tuple(serials.shape)} do not match "
                f"capacity={self.capacity}, dim={self.dim}"
            )
        if values is not None and values.shape[0] != self.capacity:
            raise ValueError(f"FactBank.load_state_dict: values have {values.shape[0]} rows, expected {self.capacity}")
        self.count = count
        self.keys = keys.to(self.device, self.dtype).clone()
        self.serials = serials.to(self.device, torch.int64).clone()
        self.values = None if values is None else values.to(self.device).clone()

    @classmethod
    def from_state_dict(cls, state: dict, device=None, dtype: Optional[torch.dtype] = None) -> "FactBank":
        """A new bank sized by ``state`` (dtype: the stored keys' dtype unless given)."""
        if not isinstance(state, dict) or "dim" not in state or "capacity" not in state:
            raise ValueError("FactBank.from_state_dict: state is not a FactBank state_dict (no dim / capacity)")
        bank = cls(state["dim"], state["capacity"], device=device, dtype=dtype or state["keys"].dtype)
        bank.load_state_dict(state)
        return bank

    def __repr__(self) -> str:
        return (
            f"FactBank(dim={self.dim}, capacity={self.capacity}, len={len(self)}, count={self.count}, "
            f"value_shape={self.value_shape}, dtype={self.dtype}, device={self.device})"
        )

    # -- input checks --------------------------------------------------------------------------------
    def _check_keys(self, name: str, keys: torch.Tensor) -> torch.Tensor:
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != self.dim:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"FactBank: {name} must be a 2-D tensor (n, dim={self.dim}), got {shape}")
        if not keys.is_floating_point():
            raise ValueError(f"FactBank: {name} must be floating point, got dtype {keys.dtype}")
        keys = keys.detach().to(self.device, self.dtype)
        if not torch.isfinite(keys).all():
            raise ValueError(f"FactBank: {name} contain NaN or inf")
        return keys

    def _prepare_values(self, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().to(self.device)
        if values.is_floating_point():
            values = values.to(self.dtype)
        if self.values is None:
            self.values = torch.zeros(self.capacity, *values.shape[1:], device=self.device, dtype=values.dtype)
            if values.is_floating_point():
                self.values.fill_(math.nan)  # never-written slots are never returned; NaN makes a bug loud
            return values
        if tuple(values.shape[1:]) != self.value_shape:
            raise ValueError(
                f"FactBank.write: values have per-entry shape {tuple(values.shape[1:])}, but the bank stores "
                f"{self.value_shape} (fixed by the first write; clear() to change it)"
            )
        if values.is_floating_point() != self.values.is_floating_point():
            raise ValueError(f"FactBank.write: values have dtype {values.dtype}, the bank stores {self.values.dtype}")
        return values.to(self.values.dtype)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"FactBank: {name}={value!r} is invalid: expected an integer >= 1")


def _pad_value(dtype: torch.dtype):
    if dtype.is_floating_point:
        return math.nan
    if dtype == torch.bool or not dtype.is_signed:
        return 0
    return -1
