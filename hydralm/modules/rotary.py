"""Rotary position embedding (rotate-half form), computed from absolute positions.

Tables are not cached: cos/sin for the positions at hand cost O(N * head_dim), far below the attention
itself, and computing them from positions keeps chunked prefill and decoding trivially consistent.

On CUDA (HYDRALM_ROTARY, kernels/backend.py), training forwards on (B, H, N, D) q and k rotate them in one
Triton kernel forward and one backward (kernels/rotary/triton_rotary.py; eager, non-fp64 calls) given the
(N, D/2) tables, instead of the PyTorch form's cats and fp32 passes over each.
"""

import torch
from torch import nn

from hydralm.kernels.backend import rotary_backend
from hydralm.kernels.triton_common import eager_training_call


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., N, head_dim) by the absolute positions (N,)."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        if x.dim() == 4 and eager_training_call(x) and rotary_backend(x.is_cuda) == "triton":
            from hydralm.kernels.rotary.triton_rotary import rotary_triton

            return rotary_triton(x, angles.cos(), angles.sin())
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)
