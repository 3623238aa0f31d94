"""The Triton RMSNorm (HYDRALM_NORM=triton, kernels/norm/triton_rmsnorm.py) against the PyTorch form
(`_RMSNormFunction`, itself tested against the plain expression) on fresh random inputs: output, dx and dweight,
for fp32 and bf16 inputs and for an fp32 input under bf16 autocast (backward keeps a bf16 copy), with ragged
widths and row counts. Off GPU the kernels run in Triton's CPU interpreter (conftest.py). Tolerances, relative to
the largest value: fp32 1e-5 (the same arithmetic in another summation order); bf16 outputs and gradients 1e-2
(both round once to bf16 from fp32)."""

import pytest
import torch

from hydralm.kernels.triton_common import triton_available
from hydralm.modules.rmsnorm import RMSNorm

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def _run(monkeypatch, backend, x, weight, dy, autocast):
    monkeypatch.setenv("HYDRALM_NORM", backend)
    norm = RMSNorm(x.shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
    leaf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = norm(leaf)
    y.backward(dy.to(y.dtype))
    return y, leaf.grad, norm.weight.grad


@pytest.mark.parametrize("rows, width", [((3, 7), 768), ((37,), 100), ((2, 5), 16)])
@pytest.mark.parametrize(
    "dtype, autocast, tol", [(torch.float32, False, 1e-5), (torch.bfloat16, False, 1e-2), (torch.float32, True, 1e-2)]
)
def test_triton_rmsnorm_equals_the_pytorch_form(monkeypatch, rows, width, dtype, autocast, tol):
    gen = torch.Generator().manual_seed(width + len(rows))
    x = (torch.randn(*rows, width, generator=gen) * 3 + 0.5).to(dtype)
    weight = torch.rand(width, generator=gen) + 0.5
    dy = torch.randn(*rows, width, generator=gen)
    got = _run(monkeypatch, "triton", x, weight, dy, autocast)
    expected = _run(monkeypatch, "torch", x, weight, dy, autocast)
    for name, a, b in zip(["y", "dx", "dweight"], got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _rel(a, b) < tol, f"{name}: {_rel(a, b):.2e}"


class _DropLastRow:
    """A launcher of the backward kernel that tells it there is one row fewer (a missed row: its dx is never
    written and its share of dweight never added)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args[:6], args[6] - 1, *args[7:], **kwargs)


def test_the_comparison_fails_when_the_backward_misses_a_row(monkeypatch):
    """Sabotage: the same comparison, with the backward kernel missing the last of 37 rows, fails on dweight."""
    import hydralm.kernels.norm.triton_rmsnorm as module

    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(37, 100, generator=gen), torch.randn(37, 100, generator=gen)
    weight = torch.rand(100, generator=gen) + 0.5
    expected = _run(monkeypatch, "torch", x, weight, dy, False)
    assert _rel(_run(monkeypatch, "triton", x, weight, dy, False)[2], expected[2]) < 1e-5
    monkeypatch.setattr(module, "_rmsnorm_bwd_kernel", _DropLastRow(module._rmsnorm_bwd_kernel))
    assert _rel(_run(monkeypatch, "triton", x, weight, dy, False)[2], expected[2]) > 1e-3


def test_fp64_and_empty_inputs_keep_the_pytorch_form(monkeypatch):
    """fp64 has no Triton path, and an empty batch launches nothing: both give the PyTorch form's result."""
    monkeypatch.setenv("HYDRALM_NORM", "triton")
    norm = RMSNorm(8).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    y = norm(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, norm.reference(x))
    empty = torch.randn(0, 8, requires_grad=True)
    norm.float()(empty).sum().backward()
    assert empty.grad.shape == (0, 8)
