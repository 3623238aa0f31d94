"""Utilities for HydraLM decode states: the per-layer list of typed states from ``init_state`` / ``forward``
(hydralm/modules/mixer.py defines the contract, each layer its state class).

Each layer state holds batch-first tensors plus counters (``pos``) shared by every row. Some layers keep storage
that is not part of the state (a retrieval bank's spare capacity, ring slots that the stream has left); each
state's ``contents()`` says what is, and equality compares that (docs/architecture.md, section 6).
"""

from typing import Iterable, Optional, Sequence, Union

import torch

from hydralm.modules.mixer import DecodeState, LayerState, storage_bytes

State = DecodeState  # one LayerState per layer


def clone_state(state: Optional[DecodeState]) -> Optional[DecodeState]:
    """An independent deep copy with the same shapes.

    Use it when two continuations of one state must both stay alive (in-place bank appends of one would
    otherwise be visible to the other's later appends).
    """
    if state is None:
        return None
    return [layer.clone() for layer in state]


def state_bytes(state: Optional[DecodeState]) -> int:
    """Bytes of memory the state's tensors hold, counted by storage: spare bank capacity and any larger
    buffer a tensor is a view of are included, and a storage shared by several tensors counts once."""
    if state is None:
        return 0
    return storage_bytes(t for layer in state for t in layer.tensors().values())


def select_rows(state: DecodeState, rows: Union[torch.Tensor, Sequence[int]]) -> DecodeState:
    """The state of a subset (or reordering) of the batch rows; counters are shared by all rows and kept."""
    return [layer.select_rows(rows) for layer in state]


def stack_states(states: Iterable[DecodeState]) -> DecodeState:
    """Concatenate states along the batch axis. Every state must be at the same stream position (the
    counters are shared by all rows); states of different lengths raise ValueError."""
    states = list(states)
    if not states:
        raise ValueError("stack_states needs at least one state")
    n_layers = len(states[0])
    if any(len(s) != n_layers for s in states):
        raise ValueError("stack_states: states have different numbers of layers")
    out = []
    for i in range(n_layers):
        layers = [s[i] for s in states]
        kinds = {type(layer).__name__ for layer in layers}
        if len(kinds) > 1:
            raise ValueError(f"stack_states: layer {i} states are of different types {sorted(kinds)}")
        out.append(type(layers[0]).stack(layers))
    return out


def states_equal(a: Optional[DecodeState], b: Optional[DecodeState]) -> bool:
    """Bit-exact equality of two states' contents (``LayerState.contents``: valid entries only)."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(la.equal(lb) for la, lb in zip(a, b))


__all__ = ["State", "LayerState", "clone_state", "state_bytes", "select_rows", "stack_states", "states_equal"]
