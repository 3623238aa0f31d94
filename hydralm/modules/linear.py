"""Linear: nn.Linear (same parameters, init and state_dict) whose few-row calls without autograd may run the
decode GEMV kernel (HYDRALM_DECODE_LINEAR, hydralm/kernels/linear/). The blocks' projections use it; the LM
head (tied to the embedding) does not.

BlockIO: what surrounds a sublayer (mixer or MLP) in its block during a decode step, the block's RMSNorm before
the sublayer's first projection and the residual added after its last, so that HYDRALM_DECODE_LINEAR=fused can
fold them into those projections' GEMVs (one kernel each instead of a norm or an add between them)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.kernels.linear import decode_linear, folds_into_gemv, triton_gemv
from hydralm.modules.rmsnorm import RMSNorm


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


class BlockIO:
    """project_in(linear, x) = linear(norm(x)); project_out(linear, o) = residual + linear(o). Without a norm or
    a residual (PLAIN_IO, what a mixer's step defaults to) they are the bare projections. Where the call folds
    (`folds_into_gemv`) the norm, SwiGLU's product and the add run inside the GEMV, rounding where the modules
    do (kernels/linear/triton_gemv.py); elsewhere the modules run as written."""

    def __init__(self, norm: Optional[RMSNorm] = None, residual: Optional[torch.Tensor] = None):
        self.norm, self.residual = norm, residual

    def project_in(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return linear(x)
        if folds_into_gemv(x, linear.weight, linear.bias):
            return triton_gemv.gemv(x, linear.weight, norm_weight=self.norm.weight, eps=self.norm.eps)
        return linear(self.norm(x))

    def project_out(self, linear: nn.Linear, o: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        """swiglu: o is [gate | up] and the projection's input silu(gate) * up (SwiGLU's down projection)."""
        residual = self.residual
        if folds_into_gemv(o, linear.weight, linear.bias) and (residual is None or residual.dtype == o.dtype):
            return triton_gemv.gemv(o, linear.weight, residual=residual, swiglu=swiglu)
        if swiglu:
            gate, up = o.chunk(2, dim=-1)
            o = F.silu(gate) * up
        y = linear(o)
        return y if residual is None else residual.reshape(y.shape) + y


PLAIN_IO = BlockIO()
