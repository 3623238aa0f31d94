"""What the memory-lean autograd Functions (SwiGLU's down projection, the short conv) share: backward recomputes
part of forward, and must run it under forward's autocast state, as autograd's own nodes do."""

from typing import Tuple

import torch

AutocastState = Tuple[str, bool, torch.dtype]


def autocast_state(tensor: torch.Tensor) -> AutocastState:
    """The autocast state of `tensor`'s device type now (call in forward; keep it on ctx)."""
    device = tensor.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def autocast_as(state: AutocastState) -> torch.autocast:
    """A context that restores a state from ``autocast_state`` (use in backward)."""
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)
