"""Utilities for HydraLM decode states (the per-layer list of dicts from ``init_state`` / ``forward``).

A layer state maps names to tensors whose first axis is the batch, plus Python ints (``pos``,
``n_chunks``) shared by every row. Retrieval layers keep a chunk bank with spare capacity
(``bank_k``, ``bank_v``, ``summaries`` hold ``capacity >= n_chunks`` entries on axis 2); only the first
``n_chunks`` are part of the state, the rest may hold writes of a later branch (architecture.md, section 3.3).
"""

from typing import Iterable, List, Optional, Sequence, Union

import torch

State = List[dict]
BANK_KEYS = ("bank_k", "bank_v", "summaries")  # retrieval tensors whose axis 2 has spare capacity


def _used(layer: dict, key: str, value):
    """The part of a tensor that belongs to the state: banks are cut to their first n_chunks entries."""
    if key in BANK_KEYS and "n_chunks" in layer and torch.is_tensor(value):
        return value[:, :, : layer["n_chunks"]]
    return value


def clone_state(state: Optional[State]) -> Optional[State]:
    """An independent deep copy; retrieval banks are compacted to their used prefix (capacity = n_chunks).

    Use it when two continuations of one state must both stay alive (in-place bank appends of one would
    otherwise be visible to the other's later appends).
    """
    if state is None:
        return None
    return [
        {key: (_used(layer, key, value).clone() if torch.is_tensor(value) else value) for key, value in layer.items()}
        for layer in state
    ]


def state_bytes(state: Optional[State]) -> int:
    """Bytes of memory the state's tensors hold, counted by storage: spare bank capacity and any larger
    buffer a tensor is a view of are included, and a storage shared by several tensors counts once."""
    if state is None:
        return 0
    seen, total = set(), 0
    for layer in state:
        for value in layer.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                key = (storage.data_ptr(), value.device, storage.nbytes())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total


def select_rows(state: State, rows: Union[torch.Tensor, Sequence[int]]) -> State:
    """The state of a subset (or reordering) of the batch rows; ints are shared by all rows and kept."""
    out = []
    for layer in state:
        new = {}
        for key, value in layer.items():
            if torch.is_tensor(value):
                index = torch.as_tensor(rows, dtype=torch.long, device=value.device)
                value = _used(layer, key, value).index_select(0, index)
            new[key] = value
        out.append(new)
    return out


def stack_states(states: Iterable[State]) -> State:
    """Concatenate states along the batch axis. Every state must be at the same stream position (the
    ints ``pos`` / ``n_chunks`` are shared by all rows); states of different lengths raise ValueError."""
    states = list(states)
    if not states:
        raise ValueError("stack_states needs at least one state")
    n_layers = len(states[0])
    if any(len(s) != n_layers for s in states):
        raise ValueError("stack_states: states have different numbers of layers")
    out = []
    for i in range(n_layers):
        layers = [s[i] for s in states]
        if any(layer.keys() != layers[0].keys() for layer in layers):
            raise ValueError(f"stack_states: layer {i} states have different keys")
        for key, value in layers[0].items():  # positions first: they explain any shape mismatch
            values = [layer[key] for layer in layers]
            if not torch.is_tensor(value) and any(v != value for v in values):
                raise ValueError(
                    f"stack_states: layer {i} {key!r} differs between states ({values}); rows of one "
                    f"state share one stream position, so only states of equal length can be stacked"
                )
        out.append(
            {
                key: (
                    torch.cat([_used(layer, key, layer[key]) for layer in layers], dim=0)
                    if torch.is_tensor(value)
                    else value
                )
                for key, value in layers[0].items()
            }
        )
    return out


def states_equal(a: Optional[State], b: Optional[State]) -> bool:
    """Bit-exact equality of two states' contents (banks compared on their used prefix only)."""
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for la, lb in zip(a, b):
        if la.keys() != lb.keys():
            return False
        for key in la:
            va, vb = _used(la, key, la[key]), _used(lb, key, lb[key])
            if torch.is_tensor(va) != torch.is_tensor(vb):
                return False
            if torch.is_tensor(va):
                if va.dtype != vb.dtype or va.shape != vb.shape or not torch.equal(va, vb):
                    return False
            elif va != vb:
                return False
    return True
