"""The SwiGLU MLP's training path (hydralm/modules/swiglu.py) recomputes silu(gate) * up in backward instead of
storing it: the same outputs and gradients as plain autograd (fp64: to 1e-12; bf16 autocast: to 1e-2 relative,
other roundings), and 2 x hidden fewer values stored per token."""

import torch
import torch.nn.functional as F
from helpers import stored_bytes

from hydralm.modules.swiglu import SwiGLU


def _plain(mlp, x):
    gate, up = F.linear(x, mlp.gate_up.weight).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, mlp.down.weight)


def _grads(fn, mlp, x, grad):
    out = fn(x)
    return [out, *torch.autograd.grad(out, (x, mlp.gate_up.weight, mlp.down.weight), grad)]


def test_outputs_and_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    mlp = SwiGLU(24, 40).double()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 24, dtype=torch.float64)
    for ours, plain in zip(_grads(mlp, mlp, x, grad), _grads(lambda t: _plain(mlp, t), mlp, x, grad)):
        assert (ours - plain).abs().max() < 1e-12


def test_under_bf16_autocast_gradients_match_and_weights_get_fp32_gradients():
    torch.manual_seed(1)
    mlp = SwiGLU(32, 64)
    x = torch.randn(4, 7, 32, requires_grad=True)
    grad = torch.randn(4, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _grads(mlp, mlp, x, grad)
        plain = _grads(lambda t: _plain(mlp, t), mlp, x, grad)
    for a, b in zip(ours, plain):
        assert a.dtype == b.dtype
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()) < 1e-2


def test_backward_stores_two_hidden_widths_less_per_token():
    torch.manual_seed(2)
    hidden, tokens = 64, 3 * 5
    mlp = SwiGLU(32, hidden)
    x = torch.randn(3, 5, 32, requires_grad=True)

    saved = stored_bytes(lambda: _plain(mlp, x)) - stored_bytes(lambda: mlp(x))
    assert saved == 2 * hidden * tokens * 4  # silu(gate) and the product, fp32
