"""Helpers for multi-token decode steps (``step_many`` / ``state_after``, the layer contract in mixer.py).

A layer whose state update is simple only for a bounded number of tokens (at most one retrieval chunk completes,
no sliding-window ring slot is written twice) cuts the T tokens into pieces of at most that many: each piece is
one vectorised computation against the state the pieces before it left. ``kept`` counts the tokens kept of the
whole call; ``kept_in_piece`` turns it into each piece's count, with the same shapes for every value (a 0-dim
device tensor inside a compiled or graph-captured step).
"""

from typing import List, Tuple

import torch

from hydralm.modules.mixer import Counter


def pieces(tokens: int, limit: int) -> List[Tuple[int, int]]:
    """(start, length) of consecutive pieces of at most `limit` tokens covering `tokens`."""
    return [(start, min(limit, tokens - start)) for start in range(0, tokens, limit)]


def kept_in_piece(kept: Counter, start: int, length: int) -> Counter:
    """How many of a piece's tokens lie within the first `kept` tokens of the call: 0 .. length."""
    if torch.is_tensor(kept):
        return (kept - start).clamp(0, length)
    return min(max(kept - start, 0), length)


def ring_ids(last: Counter, capacity: int, device: torch.device) -> torch.Tensor:
    """(capacity,) the id each slot of a ring holds once ids 0 .. `last` were written in turn (id j in slot
    j % capacity): the largest j <= last in the slot's class; negative where no id was written yet."""
    slots = torch.arange(capacity, device=device)
    return last - torch.remainder(last - slots, capacity)


def check_kept(kept: Counter, tokens: int) -> None:
    """A host `kept` must lie in 1 .. tokens (a device counter is the caller's to keep in range)."""
    if not torch.is_tensor(kept) and (isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= tokens):
        raise ValueError(f"kept={kept!r} must be an int in [1, {tokens}] (the tokens stepped) or a device counter")
