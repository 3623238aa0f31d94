"""Linear: nn.Linear (same parameters, init and state_dict) whose few-row calls without autograd may run the
decode GEMV kernel (HYDRALM_DECODE_LINEAR, hydralm/kernels/linear/). The blocks' projections use it; the LM
head (tied to the embedding) does not."""

import torch
from torch import nn

from hydralm.kernels.linear import decode_linear


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)
