"""Slot reads and writes on fixed-shape buffers, indexed by a counter that is a Python int (eager decoding) or
a 0-dim int64 tensor (a StaticDecoder's compiled / CUDA-graph step).

With an int the index is a host value: no tensor is made from host data, so a GPU step never synchronises, and a
write whose condition is known to be False costs nothing. With a tensor every write happens, masked: the shapes
and the kernels are the same at every step, which is what compiling and capturing need. Both give the same
values (``torch.where(False, new, old)`` is ``old`` bit for bit). Writes return new tensors: states are values.
"""

from typing import Union

import torch

Index = Union[int, torch.Tensor]
Condition = Union[bool, torch.Tensor]


def positions(start: Index, n: int, device: torch.device) -> torch.Tensor:
    """The n stream positions start .. start + n - 1 as a (n,) tensor."""
    if torch.is_tensor(start):
        return start + torch.arange(n, device=device)
    return torch.arange(start, start + n, device=device)


def read_slot(buffer: torch.Tensor, dim: int, slot: Index) -> torch.Tensor:
    """buffer's entry `slot` along `dim` (that dim removed)."""
    if torch.is_tensor(slot):
        return buffer.index_select(dim, slot.reshape(1)).squeeze(dim)
    return buffer.select(dim, slot)


def write_slot(
    buffer: torch.Tensor, dim: int, slot: Index, value: torch.Tensor, when: Condition = True
) -> torch.Tensor:
    """A copy of buffer with entry `slot` along `dim` set to value (shaped like ``read_slot``'s result) if `when`."""
    value = value.to(buffer.dtype)
    if not torch.is_tensor(slot) and not torch.is_tensor(when):
        if not when:
            return buffer
        out = buffer.clone()
        out.select(dim, slot).copy_(value)
        return out
    index = torch.as_tensor(slot, device=buffer.device).reshape(1)
    if torch.is_tensor(when) or not when:
        value = torch.where(torch.as_tensor(when, device=buffer.device), value, read_slot(buffer, dim, index))
    return buffer.index_copy(dim, index, value.unsqueeze(dim))


def where(when: Condition, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new if `when` else old; a Python bool picks without computing anything."""
    if torch.is_tensor(when):
        return torch.where(when, new, old)
    return new if when else old
