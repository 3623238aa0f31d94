"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

In training, backward keeps only the gate_up output: silu(gate) and the product (2 x hidden values per token,
what autograd would otherwise store, ~10 GiB of HydraLM-160m's activations at 16k x 4) are recomputed there
from it (`_SwiGLUDown`; elementwise work, no extra matmul). On CUDA (HYDRALM_SWIGLU, kernels/backend.py) that
elementwise work runs as one Triton kernel forward and one backward on the whole gate_up output
(kernels/activation/triton_swiglu.py; eager, bias-free calls). Without autograd (inference, decoding) the plain
ops run, so the down projection can take the decode GEMV, with the product folded in under
HYDRALM_DECODE_LINEAR=fused (modules/linear.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.kernels.backend import swiglu_backend
from hydralm.kernels.triton_common import eager_training_call
from hydralm.modules.linear import PLAIN_IO, BlockIO, Linear
from hydralm.modules.recompute import autocast_as, autocast_state


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        # gate and up share one matmul; the split happens on the output.
        self.gate_up = Linear(d_model, 2 * hidden, bias=False)
        self.down = Linear(hidden, d_model, bias=False)
        self.down.residual_out = True  # scaled init, see HydraLM._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        if torch.is_grad_enabled() and self.down.bias is None:
            if eager_training_call(h) and swiglu_backend(x.is_cuda) == "triton":
                from hydralm.kernels.activation.triton_swiglu import swiglu_down_triton

                return swiglu_down_triton(h, self.down.weight)
            gate, up = h.chunk(2, dim=-1)
            return _SwiGLUDown.apply(gate, up, self.down.weight)
        return PLAIN_IO.project_out(self.down, h, swiglu=True)

    def step(self, x: torch.Tensor, io: BlockIO) -> torch.Tensor:
        """The sublayer in a decode step (no autograd): io.residual + down(silu(gate) * up) of io.norm(x), the
        norm, the product and the add folded into the two GEMVs under HYDRALM_DECODE_LINEAR=fused."""
        return io.project_out(self.down, io.project_in(self.gate_up, x), swiglu=True)


class _SwiGLUDown(torch.autograd.Function):
    """F.linear(silu(gate) * up, weight), saving gate, up (views of one tensor) and the weight only. Backward
    recomputes the product (no matmul) and runs its matmuls under forward's autocast state, as autograd's
    own linear would."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.autocast = autocast_state(gate)
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        gate_, up_ = gate.detach().requires_grad_(), up.detach().requires_grad_()
        with torch.enable_grad():
            product = F.silu(gate_) * up_
        with autocast_as(ctx.autocast):
            grad_product = grad_out @ weight  # (..., hidden)
            grad_weight = grad_out.flatten(0, -2).t() @ product.detach().flatten(0, -2)  # (d_model, hidden)
        grad_gate, grad_up = torch.autograd.grad(product, (gate_, up_), grad_product.to(product.dtype))
        return grad_gate, grad_up, grad_weight.to(weight.dtype)
