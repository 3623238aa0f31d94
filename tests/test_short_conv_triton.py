"""The Triton short conv (HYDRALM_SHORT_CONV=triton, kernels/conv/triton_short_conv.py) against the plain expression
silu(conv1d(zero-padded x)) in fp64 and against the PyTorch form the blocks run on CPU (`_ConvSiLU`), on fresh random
inputs: the output and the gradients of x and of the weight, for x a strided slice of a wider tensor (as the block
passes the q/k/v part of its fused projection), ragged lengths and widths that do not fill a tile, kernel sizes 2-4,
and lengths that span several backward programs (their dw partial sums are added afterwards). Off GPU the kernels run
in Triton's CPU interpreter (conftest.py). Tolerances, relative to the largest value: fp32 1e-5 (other summation
orders); bf16 x with an fp32 weight 1e-2 (bf16 output and dx: one rounding each)."""

import pytest
import torch
import torch.nn.functional as F

from hydralm import HydraConfig
from hydralm.kernels import backend
from hydralm.kernels.triton_common import triton_available
from hydralm.modules.gated_deltanet import GatedDeltaNet
from hydralm.modules.short_conv import ShortConv, _ConvSiLU

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _plain(x, weight):
    K = weight.shape[-1]
    full = F.pad(x, (0, 0, K - 1, 0))
    return F.silu(F.conv1d(full.transpose(1, 2), weight.to(x.dtype), groups=x.shape[-1]).transpose(1, 2))


def _triton(x, weight):
    from hydralm.kernels.conv.triton_short_conv import short_conv_triton

    return short_conv_triton(x, weight)


def _pytorch_form(x, weight):
    return _ConvSiLU.apply(x, x.new_zeros(x.shape[0], weight.shape[-1] - 1, x.shape[-1]), weight)


def _run(fn, x, weight, grad):
    """fn's output and the gradients of x and the weight, for fresh leaves of the same values; x is passed as a
    strided slice of a wider leaf."""
    wide = torch.cat([torch.zeros_like(x[..., :3]), x, torch.zeros_like(x[..., :5])], dim=-1).requires_grad_()
    weight_leaf = weight.clone().requires_grad_()
    out = fn(wide[..., 3 : 3 + x.shape[-1]], weight_leaf)
    out.backward(grad.to(out.dtype))
    return out.detach(), wide.grad[..., 3 : 3 + x.shape[-1]], weight_leaf.grad


def _inputs(B, N, C, K, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=gen).to(dtype)
    weight = torch.randn(C, 1, K, generator=gen) / K**0.5
    grad = torch.randn(B, N, C, generator=gen)
    return x, weight, grad


@pytest.mark.parametrize("B, N, C, K", [(2, 150, 200, 4), (1, 7, 130, 4), (3, 65, 64, 3), (1, 600, 72, 2)])
def test_triton_short_conv_equals_the_plain_expression(B, N, C, K):
    x, weight, grad = _inputs(B, N, C, K, seed=N + C)
    got = _run(_triton, x, weight, grad)
    exact = _run(_plain, x.double(), weight.double(), grad.double())
    pytorch_form = _run(_pytorch_form, x, weight, grad)
    for name, a, b, c in zip(["out", "grad x", "grad weight"], got, exact, pytorch_form):
        assert a.dtype == c.dtype == torch.float32 and a.shape == b.shape, name
        assert _rel(a, b) < 1e-5, f"{name} vs fp64: {_rel(a, b):.2e}"
        assert _rel(a, c) < 1e-5, f"{name} vs the PyTorch form: {_rel(a, c):.2e}"


def test_bf16_input_keeps_its_dtype_and_an_fp32_weight_its_own():
    """Under bf16 autocast the block's projection gives a bf16 x; the conv weight stays fp32."""
    x, weight, grad = _inputs(2, 90, 100, 4, seed=3, dtype=torch.bfloat16)
    got = _run(_triton, x, weight, grad)
    exact = _run(_plain, x.double(), weight.double(), grad.double())
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32]
    for name, a, b in zip(["out", "grad x", "grad weight"], got, exact):
        assert _rel(a, b) < 1e-2, f"{name}: {_rel(a, b):.2e}"


class _DropFirstTapGradient:
    """The dz kernel, with the first tap's dw partial sums zeroed after each launch."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            args[4][..., 0] = 0.0  # dw_part (programs, C, K)

        return launch


def test_the_comparison_fails_when_one_taps_gradient_is_dropped(monkeypatch):
    """Sabotage: the output and grad x still match, grad weight does not."""
    import hydralm.kernels.conv.triton_short_conv as module

    x, weight, grad = _inputs(1, 40, 24, 4, seed=5)
    exact = _run(_plain, x.double(), weight.double(), grad.double())
    monkeypatch.setattr(module, "_conv_bwd_dz_kernel", _DropFirstTapGradient(module._conv_bwd_dz_kernel))
    got = _run(_triton, x, weight, grad)
    assert _rel(got[0], exact[0]) < 1e-5 and _rel(got[1], exact[1]) < 1e-5
    assert _rel(got[2], exact[2]) > 1e-1


def test_a_carried_cache_takes_the_pytorch_form_when_gradients_are_wanted(monkeypatch):
    """The kernels' backward starts from zeros: a training call with a cache must not reach them."""
    import hydralm.kernels.conv.triton_short_conv as module

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel ran on a call with a cache and gradients")

    monkeypatch.setattr(module, "short_conv_triton", refuse)
    monkeypatch.setattr(module, "short_conv_forward", refuse)
    conv = ShortConv(16, 4)
    x, cache = torch.randn(2, 9, 16), torch.randn(2, 3, 16)
    y, new_cache = conv(x, cache, kernel="triton")
    expected, _ = conv(x, cache, kernel="torch")
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("N", [1, 2, 40])  # shorter and longer than the cache (kernel 4: 3 rows)
def test_without_gradients_the_kernel_reads_a_carried_cache(N):
    """Chunked prefill and streaming: the rows before the call come from the cache (any float dtype)."""
    conv = ShortConv(200, 4)
    x = torch.randn(2, N, 200)
    for cache in (torch.randn(2, 3, 200), torch.randn(2, 3, 200).to(torch.bfloat16)):
        with torch.no_grad():
            got, got_cache = conv(x, cache, kernel="triton")
            expected, expected_cache = conv(x, cache, kernel="torch")
        assert _rel(got, expected) < 1e-5, f"{_rel(got, expected):.2e}"
        torch.testing.assert_close(got_cache, expected_cache, rtol=0, atol=0)


def test_a_cache_of_the_wrong_shape_is_refused():
    from hydralm.kernels.conv.triton_short_conv import short_conv_forward

    with pytest.raises(ValueError, match=r"the conv cache must have shape \(2, 3, 8\), got \(2, 2, 8\)"):
        short_conv_forward(torch.randn(2, 5, 8), torch.randn(8, 1, 4), torch.randn(2, 2, 8))


def test_a_gated_deltanet_block_gives_the_same_outputs_state_and_gradients_with_the_triton_conv(monkeypatch):
    cfg = HydraConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=2, dn_chunk_size=4, layer_types=["deltanet"])
    layer = GatedDeltaNet(cfg)
    x = torch.randn(2, 13, 32, requires_grad=True)
    results = {}
    for kernel in ("torch", "triton"):
        monkeypatch.setenv("HYDRALM_SHORT_CONV", kernel)
        y, state = layer(x)
        results[kernel] = (y, state.S, state.conv, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()]))
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_with_the_triton_conv_equals_one_call(monkeypatch):
    """C1 for a Gated DeltaNet block on this path: the state carried over three calls gives the one call's outputs."""
    monkeypatch.setenv("HYDRALM_SHORT_CONV", "triton")
    cfg = HydraConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=2, dn_chunk_size=4, layer_types=["deltanet"])
    layer = GatedDeltaNet(cfg)
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        whole, _ = layer(x)
        pieces, state = [], None
        for part in x.split([2, 13, 8], dim=1):
            y, state = layer(part, state)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_the_switch(monkeypatch):
    monkeypatch.delenv("HYDRALM_SHORT_CONV", raising=False)
    monkeypatch.setattr(backend, "gdn_modules_backend", lambda is_cuda: "fla" if is_cuda else "torch")
    assert backend.short_conv_backend(is_cuda=True) == "triton"  # auto: ours on CUDA
    assert backend.short_conv_backend(is_cuda=False) == "torch"  # else what HYDRALM_GDN_MODULES picks
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert backend.short_conv_backend(is_cuda=True) == "fla"
    monkeypatch.undo()
    monkeypatch.delenv("HYDRALM_SHORT_CONV", raising=False)
    monkeypatch.setenv("HYDRALM_SHORT_CONV", "triton")
    assert backend.short_conv_backend(is_cuda=False) == "triton"  # the interpreter runs it (conftest.py)
    monkeypatch.setenv("HYDRALM_SHORT_CONV", "fla")
    with pytest.raises(RuntimeError, match="HYDRALM_SHORT_CONV=fla needs a CUDA device"):
        backend.short_conv_backend(is_cuda=False)
    monkeypatch.setenv("HYDRALM_SHORT_CONV", "cudnn")
    with pytest.raises(ValueError, match="HYDRALM_SHORT_CONV='cudnn' is invalid"):
        backend.short_conv_backend(is_cuda=False)
