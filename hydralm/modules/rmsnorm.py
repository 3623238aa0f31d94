"""RMSNorm, and the SiLU-gated variant used on Gated DeltaNet outputs."""

import torch
import torch.nn.functional as F
from torch import nn


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (fp64 for fp64): bf16 sums of squares lose too much precision at d_model >= 512.
        xf = x.to(_norm_dtype(x))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


class _GatedRMSNormFunction(torch.autograd.Function):
    """RMSNorm(x) * weight * silu(gate), computed in fp32 but keeping for backward only x, gate (their own dtype)
    and the per-row 1 / rms: autograd through the plain expression would keep several fp32 (B, T, H, D) copies."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps: float):
        xf = x.to(_norm_dtype(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (xf * rstd * weight.to(xf.dtype)) * F.silu(gate.to(xf.dtype))
        ctx.save_for_backward(x, gate, weight, rstd)
        return y.to(torch.promote_types(x.dtype, gate.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, gate, weight, rstd = ctx.saved_tensors
        dtype = rstd.dtype
        x_hat, g, dy, w = x.to(dtype) * rstd, gate.to(dtype), grad_y.to(dtype), weight.to(dtype)
        sig = torch.sigmoid(g)
        normed = x_hat * w
        grad_gate = dy * normed * sig * (1 + g * (1 - sig))  # d silu(g) / dg = sig (1 + g (1 - sig))
        grad_normed = dy * g * sig
        grad_weight = (grad_normed * x_hat).reshape(-1, x.shape[-1]).sum(0)
        grad_x_hat = grad_normed * w
        grad_x = rstd * (grad_x_hat - x_hat * (grad_x_hat * x_hat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_gate.to(gate.dtype), grad_weight.to(weight.dtype), None


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * SiLU(gate): the output gate of Gated DeltaNet (normalise, then gate)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return _GatedRMSNormFunction.apply(x, gate, self.weight, self.eps)

    def reference(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The plain expression (the test oracle): autograd keeps its fp32 intermediates."""
        return super().forward(x) * F.silu(gate)
