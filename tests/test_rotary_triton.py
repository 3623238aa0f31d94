"""The Triton rotary embedding (HYDRALM_ROTARY=triton, kernels/rotary/triton_rotary.py) against the module's
PyTorch form (modules/rotary.py) on fresh random inputs: q and k rotated as the attention layers rotate them
(non-contiguous (B, H, N, D) views of one qkv tensor), an odd token count, head sizes 8 and 64 (a half head
that does not fill the kernel's columns, and the 160m's), positions from 100; the output and the gradient of the
qkv tensor, fp32 and bf16. Off GPU the kernel runs in Triton's CPU interpreter (conftest.py). Tolerances,
relative to the largest value: fp32 1e-6 (the same products and sums; a GPU may fuse one into an FMA); bf16 1e-2
(the PyTorch form rounds the rotated half's gradient to bf16 before adding, the kernel once at the end)."""

import pytest
import torch

from hydralm.kernels import backend
from hydralm.kernels.triton_common import triton_available
from hydralm.modules.rotary import Rotary

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")

B, N, H = 2, 37, 3


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def _inputs(head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, head_dim, generator=gen).to(dtype)
    grads = [torch.randn(B, H, N, head_dim, generator=gen) for _ in range(2)]
    return qkv, grads


def _run(monkeypatch, choice, qkv, grads, positions):
    """Rotated q and k, and the gradient of the qkv tensor they are views of, with HYDRALM_ROTARY=choice."""
    monkeypatch.setenv("HYDRALM_ROTARY", choice)
    rotary = Rotary(qkv.shape[-1])
    leaf = qkv.clone().requires_grad_()
    q, k, _ = (t.transpose(1, 2) for t in leaf.unbind(2))  # (B, H, N, D), strided as in the layers
    assert not q.is_contiguous()
    out_q, out_k = rotary(q, positions), rotary(k, positions)
    torch.autograd.backward((out_q, out_k), [g.to(out_q.dtype) for g in grads])
    return out_q, out_k, leaf.grad


@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_triton_rotary_equals_the_pytorch_form(monkeypatch, head_dim, dtype, tol):
    qkv, grads = _inputs(head_dim, dtype, seed=head_dim)
    positions = torch.arange(100, 100 + N)
    got = _run(monkeypatch, "triton", qkv, grads, positions)
    expected = _run(monkeypatch, "torch", qkv, grads, positions)
    for name, a, b in zip(["q", "k", "grad qkv"], got, expected):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        assert _rel(a, b) < tol, f"{name}: {_rel(a, b):.2e}"


def test_other_ranks_and_strides_are_rotated_alike():
    """rotary_triton on a 3-d input and on one whose last dimension is strided (both copied into the kernel's
    layout first) gives the PyTorch form's result and gradient."""
    from hydralm.kernels.rotary.triton_rotary import rotary_triton

    rotary = Rotary(16)
    positions = torch.arange(5, 5 + N)
    angles = positions.float()[:, None] * rotary.inv_freq
    base = torch.randn(4, 32, N)
    for x in (torch.randn(4, N, 16), base.transpose(1, 2)[..., ::2]):
        grad = torch.randn(x.shape)
        leaves = [x.clone().requires_grad_() for _ in range(2)]
        got = rotary_triton(leaves[0], angles.cos(), angles.sin())
        with torch.no_grad():
            expected = rotary(x, positions)
        got.backward(grad)
        torch.autograd.backward(rotary(leaves[1], positions), grad)
        assert got.shape == x.shape and _rel(got, expected) < 1e-6
        assert _rel(leaves[0].grad, leaves[1].grad) < 1e-6


def test_the_switch_routes_rotary_through_the_kernel(monkeypatch):
    """HYDRALM_ROTARY=triton sends a training forward through `rotary_triton`; auto picks it on CUDA with triton
    (its GPU check passed), not on CPU; no-grad and fp64 calls keep the PyTorch form; a bad value is refused."""
    import hydralm.kernels.rotary.triton_rotary as module

    calls = []
    kernel_path = module.rotary_triton
    monkeypatch.setattr(module, "rotary_triton", lambda *args: calls.append(1) or kernel_path(*args))
    rotary, positions = Rotary(8), torch.arange(N)
    x = torch.randn(B, H, N, 8)

    monkeypatch.setenv("HYDRALM_ROTARY", "triton")
    rotary(x, positions)
    assert calls == [1]
    with torch.no_grad():
        rotary(x, positions)
    rotary.double()(x.double(), positions)
    assert calls == [1]
    monkeypatch.setenv("HYDRALM_ROTARY", "auto")
    rotary.float()(x, positions)
    assert calls == [1]

    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert backend.rotary_backend(is_cuda=True) == "triton"
    monkeypatch.setenv("HYDRALM_ROTARY", "triton")
    assert backend.rotary_backend(is_cuda=True) == "triton"
    monkeypatch.setenv("HYDRALM_ROTARY", "fast")
    with pytest.raises(ValueError, match="HYDRALM_ROTARY='fast' is invalid"):
        rotary(x, positions)


class _ForwardAngleInBackward:
    """A launcher of the kernel that always rotates by +angle: backward then uses +sin where it needs -sin."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **{**kwargs, "INVERSE": False})


def test_the_comparison_fails_when_the_backward_rotates_the_wrong_way(monkeypatch):
    """Sabotage: the same comparison, with backward rotating by +angle, still matches forward but fails on the
    gradient."""
    import hydralm.kernels.rotary.triton_rotary as module

    qkv, grads = _inputs(64, torch.float32, seed=1)
    positions = torch.arange(100, 100 + N)
    expected = _run(monkeypatch, "torch", qkv, grads, positions)
    assert _rel(_run(monkeypatch, "triton", qkv, grads, positions)[2], expected[2]) < 1e-6
    monkeypatch.setattr(module, "_rotary_kernel", _ForwardAngleInBackward(module._rotary_kernel))
    got = _run(monkeypatch, "triton", qkv, grads, positions)
    assert _rel(got[0], expected[0]) < 1e-6
    assert _rel(got[2], expected[2]) > 1e-1
