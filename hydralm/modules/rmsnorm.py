"""RMSNorm, and the SiLU-gated variant used on Gated DeltaNet outputs."""

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.kernels.backend import norm_backend
from hydralm.kernels.triton_common import eager_training_call


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (fp64 for fp64): bf16 sums of squares lose too much precision at d_model >= 512.
        if torch.is_grad_enabled():  # backward keeps x and 1 / rms only (_RMSNormFunction)
            if eager_training_call(x) and norm_backend(x.is_cuda) == "triton":
                from hydralm.kernels.norm.triton_rmsnorm import rms_norm_triton

                dtype = _kept_dtype(x)  # what backward keeps of x, and the output's dtype
                return rms_norm_triton(x, self.weight, self.eps, kept_dtype=dtype, out_dtype=dtype)
            return _RMSNormFunction.apply(x, None, self.weight, self.eps)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain expression (the test oracle; what inference runs): autograd would keep its fp32 copies."""
        xf = x.to(_norm_dtype(x))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm(x) * weight [* silu(gate)], computed in fp32 but keeping for backward only x, gate and the per-row
    1 / rms: autograd through the plain expression would keep fp32 (..., d) copies. Under autocast an fp32 x (the
    residual stream) is kept in the autocast dtype, as the matmul after the norm sees it: half the bytes of the
    largest per-token tensor a block keeps twice, for a backward that is then as exact as that matmul's. The
    output (without a gate) is in that dtype too: every norm of the model feeds a projection, which would cast
    an fp32 output to it anyway, so writing it there saves that copy and its gradient's."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps: float):
        xf = x.to(_norm_dtype(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = xf * rstd * weight.to(xf.dtype)
        if gate is not None:
            y = y * F.silu(gate.to(xf.dtype))
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(_kept(x), gate, weight, rstd)
        return y.to(_kept_dtype(x) if gate is None else torch.promote_types(x.dtype, gate.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, gate, weight, rstd = ctx.saved_tensors
        dtype = rstd.dtype
        x_hat, dy, w = x.to(dtype) * rstd, grad_y.to(dtype), weight.to(dtype)
        grad_gate, grad_normed = None, dy
        if gate is not None:
            g = gate.to(dtype)
            sig = torch.sigmoid(g)
            grad_gate = (dy * x_hat * w * sig * (1 + g * (1 - sig))).to(
                gate.dtype
            )  # d silu(g)/dg = sig (1 + g (1 - sig))
            grad_normed = dy * g * sig
        grad_weight = (grad_normed * x_hat).reshape(-1, x.shape[-1]).sum(0)
        grad_x_hat = grad_normed * w
        grad_x = rstd * (grad_x_hat - x_hat * (grad_x_hat * x_hat).mean(-1, keepdim=True))
        return grad_x.to(ctx.x_dtype), grad_gate, grad_weight.to(weight.dtype), None


def _kept_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype backward keeps x in: x's own, or under autocast the autocast dtype for an fp32 x."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _kept(x: torch.Tensor) -> torch.Tensor:
    """What backward keeps of x: x itself, or under autocast an fp32 x in the autocast dtype."""
    return x.to(_kept_dtype(x))


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * SiLU(gate): the output gate of Gated DeltaNet (normalise, then gate)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, gate, self.weight, self.eps)

    def reference(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The plain expression (the test oracle): autograd keeps its fp32 intermediates."""
        return super().reference(x) * F.silu(gate)
