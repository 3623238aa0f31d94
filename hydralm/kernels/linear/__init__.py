"""Matmuls of the decode step: ``decode_linear`` picks, per call, between F.linear and the few-row Triton GEMV
(triton_gemv.py); ``kernels/backend.py`` reads the user's switch (HYDRALM_DECODE_LINEAR)."""

from typing import Optional

import torch
import torch.nn.functional as F

from hydralm.kernels.backend import decode_linear_backend
from hydralm.kernels.linear import triton_gemv


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias); a bias-free call with few rows and no autograd takes the GEMV kernel when
    HYDRALM_DECODE_LINEAR selects it."""
    if bias is None and not torch.is_grad_enabled():  # training calls take F.linear at once
        few_rows = x.dim() >= 1 and x.shape[-1] > 0 and x.numel() <= triton_gemv.MAX_ROWS * x.shape[-1]
        if few_rows and decode_linear_backend(x.is_cuda) == "gemv":
            return triton_gemv.gemv(x, weight)
    return F.linear(x, weight, bias)
