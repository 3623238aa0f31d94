"""The layer contract: what every token mixer provides, and the typed decode state it carries.

A mixer (one file under hydralm/modules/, one line in registry.py) is an ``nn.Module`` with

    state_class                                  its LayerState subclass
    init_state(batch_size, device, dtype)        an empty decode state
    forward(x (B, N, d), state=None)             -> (y (B, N, d), new state)   parallel; a state continues a stream
    step(x_t (B, d), state, io=PLAIN_IO)         -> (y_t (B, d), new state)    one token
    step_many(x (B, T, d), state, io=PLAIN_IO)   -> (y (B, T, d), trail)       T tokens, one pass over the weights
    state_after(state, trail, kept)              -> the state after the first `kept` of those T tokens
    state_growth()                               None when its state keeps one shape while decoding, else why not

In ``step`` and ``step_many`` the mixer's first projection reads ``io.project_in`` and its last one writes
through ``io.project_out`` (hydralm/modules/linear.py): the block passes its norm and residual that way, so
y = x + mixer(norm(x)), and a decode GEMV can fold them in; the default, PLAIN_IO, is the bare mixer.

``step_many`` is what speculative decoding verifies drafts with: it equals T ``step`` calls (claim C1) but reads
each weight once, and it leaves `state` as it was. Its trail (a dict of tensors: what the T tokens add, e.g.
their keys and values, or the recurrent state after each of them) lets ``state_after`` build the state after
any accepted prefix, 1 <= kept <= T, where `kept` is an int or a 0-dim device tensor: rollback is choosing
`kept`, with the same shapes whatever it is (hydralm/modules/multi_token.py, docs/inference.md).

States are values: ``forward`` and ``step`` never change what a state they were given holds (except writes
into spare capacity it cannot see, documented per layer), so keeping an old state and continuing from it later
(rollback, speculative decoding) is exact.

A state is a dataclass of batch-first tensors plus counters. A counter (``pos``) is a Python int in the states
that ``forward`` and ``step`` return, or a 0-dim int64 tensor on the device inside a ``StaticDecoder``, which
compiles and captures ``step``: the step code works with either (hydralm/modules/slots.py), so the same code
runs eager, under ``torch.compile`` and as a CUDA graph. The generic methods below cover every state; a layer
overrides ``contents`` when some of its storage is not part of the state (spare capacity, stale ring slots).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Protocol, Sequence, Tuple, Type, TypeVar, Union

import torch

if TYPE_CHECKING:
    from hydralm.modules.linear import BlockIO

Counter = Union[int, torch.Tensor]  # a Python int, or a 0-dim int64 tensor inside a StaticDecoder
S = TypeVar("S", bound="LayerState")


@dataclasses.dataclass
class LayerState:
    """Base of every layer's decode state: tensor fields are batch-first; ``COUNTERS`` name the fields shared
    by every row (Python ints or 0-dim tensors). ``FP32_FIELDS`` keep at least fp32 whatever the model dtype."""

    COUNTERS: ClassVar[Tuple[str, ...]] = ()
    FP32_FIELDS: ClassVar[Tuple[str, ...]] = ()
    # True on the buffers a StaticDecoder owns (no one keeps their old values): a layer's ``step`` may then write
    # its new state into them, where it would otherwise return new tensors that the decoder copies back. Not a
    # field: copies, clones and the states a step returns are values again.
    in_place = False

    # -- fields --------------------------------------------------------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        """The batch-first tensor fields (counters excluded)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.COUNTERS}

    def counters(self) -> Dict[str, int]:
        """The counters as Python ints (reads a device counter back to the host)."""
        return {name: int(getattr(self, name)) for name in self.COUNTERS}

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors().values())).shape[0]

    def contents(self) -> Dict[str, Any]:
        """What the state means, as named tensors and ints: what ``equal`` compares. Layers whose buffers hold
        storage that is not part of the state (spare capacity, stale ring slots) override it."""
        return {**self.tensors(), **self.counters()}

    # -- copies ----------------------------------------------------------------------------------------
    def clone(self: S) -> S:
        """An independent deep copy of the same shapes (counters copied as they are)."""
        return self._map(lambda t: t.clone(), lambda c: c.clone() if torch.is_tensor(c) else c)

    def to(self: S, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None) -> S:
        """On another device and/or for a model of another floating dtype (fp32 fields stay >= fp32)."""

        def move(name: str, t: torch.Tensor) -> torch.Tensor:
            target = None
            if dtype is not None and t.is_floating_point():
                target = torch.promote_types(dtype, torch.float32) if name in self.FP32_FIELDS else dtype
            return t.to(device=device, dtype=target)

        return self._map_named(move, lambda c: c.to(device) if torch.is_tensor(c) else c)

    def with_device_counters(self: S, device: Union[str, torch.device]) -> S:
        """A copy whose counters are 0-dim int64 tensors on `device` (what a StaticDecoder steps on)."""
        return self._map(lambda t: t.clone(), lambda c: torch.tensor(int(c), dtype=torch.long, device=device))

    def copy_(self, other: "LayerState") -> None:
        """Write `other`'s values into this state's own tensors (same shapes), in place: how a StaticDecoder keeps
        fixed buffer addresses. Tensor counters are written in place too; int counters are replaced."""
        for name, value in other.tensors().items():
            mine = getattr(self, name)
            if value is not mine:
                mine.copy_(value)
        for name in self.COUNTERS:
            mine, value = getattr(self, name), getattr(other, name)
            if not torch.is_tensor(mine):
                setattr(self, name, int(value))
            elif torch.is_tensor(value):
                if value is not mine:
                    mine.copy_(value)
            else:
                mine.fill_(value)  # a host int: a fill kernel, no host-to-device copy

    # -- batch rows ----------------------------------------------------------------------------------
    def select_rows(self: S, rows: Union[torch.Tensor, Sequence[int]]) -> S:
        """The state of a subset (or reordering) of the batch rows; counters are shared and kept."""
        index = None

        def pick(t: torch.Tensor) -> torch.Tensor:
            nonlocal index
            if index is None or index.device != t.device:
                index = torch.as_tensor(rows, dtype=torch.long, device=t.device)
            return t.index_select(0, index)

        return self._map(pick, lambda c: c)

    @classmethod
    def stack(cls: Type[S], states: Sequence[S]) -> S:
        """Concatenate along the batch axis; every state must have the same counters (one stream position)."""
        first = states[0]
        for name in cls.COUNTERS:
            values = [int(getattr(s, name)) for s in states]
            if any(v != values[0] for v in values):
                raise ValueError(
                    f"stack_states: {cls.__name__}.{name} differs between states ({values}); rows of one state "
                    f"share one stream position, so only states of equal length can be stacked"
                )
        fields = {name: torch.cat([getattr(s, name) for s in states], dim=0) for name in first.tensors()}
        fields.update({name: getattr(first, name) for name in cls.COUNTERS})
        return cls(**fields)

    # -- comparison and size -----------------------------------------------------------------------------
    def equal(self, other: "LayerState") -> bool:
        """Bit-exact equality of what the two states mean (``contents``), dtypes and shapes included."""
        if type(other) is not type(self):
            return False
        a, b = self.contents(), other.contents()
        if a.keys() != b.keys():
            return False
        for key, va in a.items():
            vb = b[key]
            if torch.is_tensor(va) != torch.is_tensor(vb):
                return False
            if torch.is_tensor(va):
                if va.dtype != vb.dtype or va.shape != vb.shape or not torch.equal(va, vb):
                    return False
            elif va != vb:
                return False
        return True

    def nbytes(self) -> int:
        """Bytes held by this state's tensor storages, each storage once (spare capacity included)."""
        return storage_bytes(self.tensors().values())

    # -- helpers ---------------------------------------------------------------------------------------
    def _map(self: S, tensor_fn, counter_fn) -> S:
        return self._map_named(lambda name, t: tensor_fn(t), counter_fn)

    def _map_named(self: S, tensor_fn, counter_fn) -> S:
        changes: Dict[str, Any] = {name: tensor_fn(name, t) for name, t in self.tensors().items()}
        changes.update({name: counter_fn(getattr(self, name)) for name in self.COUNTERS})
        return dataclasses.replace(self, **changes)


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once."""
    seen, total = set(), 0
    for value in tensors:
        storage = value.untyped_storage()
        key = (storage.data_ptr(), value.device, storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


class Mixer(Protocol):
    """What HydraLM's blocks, decoding and the state utilities rely on (see the module docstring)."""

    state_class: ClassVar[Type[LayerState]]

    def __call__(self, x: torch.Tensor, state: Optional[Any] = None) -> Tuple[torch.Tensor, LayerState]: ...

    def init_state(
        self, batch_size: int, device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32
    ) -> LayerState: ...

    def forward(self, x: torch.Tensor, state: Optional[Any] = None) -> Tuple[torch.Tensor, LayerState]: ...

    def step(self, x_t: torch.Tensor, state: Any, io: BlockIO = ...) -> Tuple[torch.Tensor, LayerState]: ...

    def step_many(self, x: torch.Tensor, state: Any, io: BlockIO = ...) -> Tuple[torch.Tensor, "Trail"]: ...

    def state_after(self, state: Any, trail: "Trail", kept: Counter) -> LayerState: ...

    def state_growth(self) -> Optional[str]: ...


DecodeState = List[LayerState]  # one entry per layer, in block order
Trail = Dict[str, torch.Tensor]  # what one layer's step_many adds to its state (the layer's own keys)


@dataclasses.dataclass
class DecodeTrail:
    """What ``HydraLM.decode_many`` leaves: the number of tokens it stepped and one trail per layer."""

    tokens: int
    layers: List[Trail]
