"""Matmuls of the decode step: ``decode_linear`` picks, per call, between F.linear and the few-row Triton GEMV
(triton_gemv.py); ``folds_into_gemv`` says whether a call may also take the elementwise ops around it into the
GEMV (the block's RMSNorm, SwiGLU's product, the residual add; modules/linear.py). ``kernels/backend.py`` reads
the user's switch (HYDRALM_DECODE_LINEAR)."""

from typing import Optional

import torch
import torch.nn.functional as F

from hydralm.kernels.backend import decode_linear_backend
from hydralm.kernels.linear import triton_gemv


def _decode_call(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """A bias-free call with few rows and no autograd: a decode step's (training calls take F.linear at once)."""
    if bias is not None or torch.is_grad_enabled():
        return False
    return x.dim() >= 1 and x.shape[-1] > 0 and x.numel() <= triton_gemv.MAX_ROWS * x.shape[-1]


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias); a bias-free call with few rows and no autograd takes the GEMV kernel when
    HYDRALM_DECODE_LINEAR selects it."""
    if _decode_call(x, bias) and decode_linear_backend(x.is_cuda) in ("gemv", "fused"):
        return triton_gemv.gemv(x, weight)
    return F.linear(x, weight, bias)


def folds_into_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether a decode call F.linear(op(x), weight) runs as one GEMV with op folded in (HYDRALM_DECODE_LINEAR=fused):
    fp32 or 16-bit activations of the weight's dtype (the folded ops compute in fp32, as the modules do for them)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dtype != weight.dtype:
        return False
    return _decode_call(x, bias) and decode_linear_backend(x.is_cuda) == "fused"
