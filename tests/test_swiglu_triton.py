"""The Triton SwiGLU (HYDRALM_SWIGLU=triton, kernels/activation/triton_swiglu.py) against the plain expression
F.linear(silu(gate) * up, weight) and the PyTorch form (`_SwiGLUDown`, itself tested against the plain expression
in test_swiglu.py) on fresh random inputs: the output and the gradients of the gate_up output h and of the weight,
with hidden sizes that do not fill a tile (72 and 100) and the 160m's 2048 over a few rows, fp32 and under bf16
autocast. Off GPU the kernels run in Triton's CPU interpreter (conftest.py). Tolerances, relative to the largest
value: fp32 1e-5 (the same arithmetic, other roundings of the sigmoid and the matmul sums); under bf16 autocast
1e-2 (bf16 h, product and gradients: each rounds to bf16 at other points)."""

import pytest
import torch
import torch.nn.functional as F

from hydralm.kernels import backend
from hydralm.kernels.triton_common import triton_available
from hydralm.modules.swiglu import SwiGLU, _SwiGLUDown

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def _plain(h, weight):
    gate, up = h.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight)


def _pytorch_form(h, weight):
    gate, up = h.chunk(2, dim=-1)
    return _SwiGLUDown.apply(gate, up, weight)


def _triton(h, weight):
    from hydralm.kernels.activation.triton_swiglu import swiglu_down_triton

    return swiglu_down_triton(h, weight)


def _run(fn, h, weight, grad, autocast=False):
    """fn's output and the gradients of h and the weight, for fresh leaves of the same values."""
    h_leaf, weight_leaf = h.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(h_leaf, weight_leaf)
    out.backward(grad.to(out.dtype))
    return out, h_leaf.grad, weight_leaf.grad


def _inputs(rows, hidden, d_model, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(*rows, 2 * hidden, generator=gen) * 2).to(dtype)
    weight = torch.randn(d_model, hidden, generator=gen) / hidden**0.5
    grad = torch.randn(*rows, d_model, generator=gen)
    return h, weight, grad


@pytest.mark.parametrize("rows, hidden, d_model", [((3, 5), 72, 24), ((37,), 100, 16), ((2, 3), 2048, 32)])
def test_triton_swiglu_equals_the_plain_expression_in_fp32(rows, hidden, d_model):
    h, weight, grad = _inputs(rows, hidden, d_model, seed=hidden)
    got = _run(_triton, h, weight, grad)
    for expected in (_run(_plain, h, weight, grad), _run(_pytorch_form, h, weight, grad)):
        for name, a, b in zip(["out", "grad h", "grad weight"], got, expected):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert _rel(a, b) < 1e-5, f"{name}: {_rel(a, b):.2e}"


@pytest.mark.parametrize("rows, hidden", [((3, 5), 72), ((2, 3), 2048)])
def test_under_bf16_autocast_the_triton_swiglu_matches_and_keeps_the_dtypes(rows, hidden):
    """bf16 h (the gate_up output under autocast) and an fp32 weight: a bf16 output and grad h, an fp32 grad
    weight, as the PyTorch form gives."""
    h, weight, grad = _inputs(rows, hidden, 24, seed=hidden + 1, dtype=torch.bfloat16)
    got = _run(_triton, h, weight, grad, autocast=True)
    expected = _run(_pytorch_form, h, weight, grad, autocast=True)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32]
    for name, a, b in zip(["out", "grad h", "grad weight"], got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _rel(a, b) < 1e-2, f"{name}: {_rel(a, b):.2e}"


def test_grad_of_h_alone_when_the_weight_is_frozen():
    """Backward without the weight's gradient skips the product's re-write; grad h is unchanged."""
    h, weight, grad = _inputs((4, 3), 72, 16, seed=7)
    leaf = h.clone().requires_grad_()
    _triton(leaf, weight).backward(grad)
    expected = _run(_plain, h, weight, grad)[1]
    assert _rel(leaf.grad, expected) < 1e-5


def test_the_switch_routes_swiglu_through_the_kernel(monkeypatch):
    """HYDRALM_SWIGLU=triton sends a training forward through `swiglu_down_triton` (same results as the PyTorch
    form); auto picks it on CUDA with triton (its GPU check passed), not on CPU; a bad value is refused."""
    import hydralm.kernels.activation.triton_swiglu as module

    calls = []
    kernel_path = module.swiglu_down_triton
    monkeypatch.setattr(module, "swiglu_down_triton", lambda *args: calls.append(1) or kernel_path(*args))
    mlp = SwiGLU(16, 72)
    x = torch.randn(3, 5, 16)

    def run(choice):
        monkeypatch.setenv("HYDRALM_SWIGLU", choice)
        mlp.zero_grad(set_to_none=True)
        out = mlp(x)
        out.square().sum().backward()
        return out, mlp.gate_up.weight.grad, mlp.down.weight.grad

    expected = run("torch")
    assert calls == []
    got = run("triton")
    assert calls == [1]
    for a, b in zip(got, expected):
        assert _rel(a, b) < 1e-5
    run("auto")
    assert calls == [1]

    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert backend.swiglu_backend(is_cuda=True) == "triton"
    monkeypatch.setenv("HYDRALM_SWIGLU", "triton")
    assert backend.swiglu_backend(is_cuda=True) == "triton"
    monkeypatch.setenv("HYDRALM_SWIGLU", "fast")
    with pytest.raises(ValueError, match="HYDRALM_SWIGLU='fast' is invalid"):
        mlp(x)


class _SwappedHalves:
    """A launcher of the backward kernel that hands it h with gate and up swapped."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def swapped(h, *args, **kwargs):
            gate, up = h.chunk(2, dim=-1)
            return launch(torch.cat([up, gate], dim=-1), *args, **kwargs)

        return swapped


def test_the_comparison_fails_when_the_backward_swaps_gate_and_up(monkeypatch):
    """Sabotage: the same comparison, with the backward kernel reading gate and up swapped, fails on both
    gradients."""
    import hydralm.kernels.activation.triton_swiglu as module

    h, weight, grad = _inputs((3, 5), 72, 24, seed=0)
    expected = _run(_plain, h, weight, grad)
    assert max(_rel(a, b) for a, b in zip(_run(_triton, h, weight, grad), expected)) < 1e-5
    monkeypatch.setattr(module, "_swiglu_bwd_kernel", _SwappedHalves(module._swiglu_bwd_kernel))
    _, grad_h, grad_weight = _run(_triton, h, weight, grad)
    assert _rel(grad_h, expected[1]) > 1e-2
    assert _rel(grad_weight, expected[2]) > 1e-2
