"""The chunked linear + cross-entropy against the full-logits reference: loss and both gradients; its Triton
softmax kernels against its PyTorch chunks."""

import pytest
import torch
import torch.nn.functional as F

from hydralm.kernels.cross_entropy import chunked as chunked_module
from hydralm.kernels.cross_entropy import chunked_linear_cross_entropy, linear_cross_entropy
from hydralm.kernels.triton_common import triton_available


def _inputs(N=37, d=24, V=53, dtype=torch.float32, ignored=0.3):
    hidden = torch.randn(N, d, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, d, dtype=dtype) / d**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < ignored] = -100
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels):
    loss = fn(hidden, weight, labels)
    grad_h, grad_w = torch.autograd.grad(loss * 1.7, (hidden, weight))  # a non-unit upstream gradient
    return loss, grad_h, grad_w


def _torch_ce(hidden, weight, labels):
    return F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, None])  # one row, a remainder chunk, exact, the default
def test_fp32_loss_and_gradients_match_full_logits(chunk_rows):
    hidden, weight, labels = _inputs()
    expected = _loss_and_grads(_torch_ce, hidden, weight, labels)
    got = _loss_and_grads(
        lambda h, w, y: chunked_linear_cross_entropy(h, w, y, chunk_rows=chunk_rows), hidden, weight, labels
    )
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_leading_dims_are_flattened_and_bad_shapes_are_named():
    hidden, weight, labels = _inputs(N=24)
    flat = linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(linear_cross_entropy(hidden.view(2, 12, -1), weight, labels.view(2, 12)), flat)
    with pytest.raises(ValueError, match="share d"):
        linear_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, labels[:-1])


def test_every_row_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, labels = _inputs()
    labels[:] = -100
    loss, grad_h, grad_w = _loss_and_grads(
        lambda h, w, y: chunked_linear_cross_entropy(h, w, y, chunk_rows=8), hidden, weight, labels
    )
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert not grad_h.any() and not grad_w.any()


def test_bf16_autocast_smoke_close_to_fp32_and_gradient_dtypes_follow_the_inputs():
    hidden, weight, labels = _inputs(N=64, d=32, V=97)
    reference = _loss_and_grads(_torch_ce, hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(
            lambda h, w, y: chunked_linear_cross_entropy(h, w, y, chunk_rows=16), hidden, weight, labels
        )
    assert got[0].dtype == torch.float32 and got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, reference):
        rel = (a - b).norm() / b.norm()
        assert rel < 3e-2, f"{name}: relative error {rel:.2e} under bf16 autocast"
    # bf16 inputs without autocast: computed in bf16, gradients come back in bf16
    bf16 = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight)]
    loss, grad_h, grad_w = _loss_and_grads(chunked_linear_cross_entropy, *bf16, labels)
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16
    assert abs(loss.item() - reference[0].item()) < 3e-2 * reference[0].item()


def test_sabotaged_backward_is_caught(monkeypatch):
    """The gradient comparison can fail: drop the onehot term and the hidden gradient must differ."""
    hidden, weight, labels = _inputs()
    expected = _loss_and_grads(_torch_ce, hidden, weight, labels)
    real = chunked_module._chunk_terms

    def wrong_targets(h_c, w, labels_c, ignore_index):
        logits, valid, target = real(h_c, w, labels_c, ignore_index)
        return logits, valid, (target + 1) % w.shape[0]

    monkeypatch.setattr(chunked_module, "_chunk_terms", wrong_targets)
    got = _loss_and_grads(lambda h, w, y: chunked_linear_cross_entropy(h, w, y, chunk_rows=8), hidden, weight, labels)
    assert not torch.allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_backend_switch_rejects_unknown_and_unavailable_choices(monkeypatch):
    hidden, weight, labels = _inputs(N=4)
    monkeypatch.setenv("HYDRALM_CROSS_ENTROPY", "fast")
    with pytest.raises(ValueError, match="HYDRALM_CROSS_ENTROPY='fast'"):
        linear_cross_entropy(hidden, weight, labels)
    monkeypatch.setenv("HYDRALM_CROSS_ENTROPY", "liger")
    with pytest.raises(RuntimeError, match="HYDRALM_CROSS_ENTROPY=liger"):
        linear_cross_entropy(hidden, weight, labels)


# The Triton softmax kernels (HYDRALM_CROSS_ENTROPY=triton; Triton's CPU interpreter off GPU) against the PyTorch
# chunks. Tolerances: fp32 1e-5 relative (the same arithmetic, another summation order); under bf16 autocast
# 1e-2 (both round the logits' gradient to bf16 once, from fp32 values that differ in the last bits).
_TRITON = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")


def _fused(chunk_rows):
    return lambda h, w, y: chunked_linear_cross_entropy(h, w, y, chunk_rows=chunk_rows, fused_softmax=True)


def _plain(chunk_rows):
    return lambda h, w, y: chunked_linear_cross_entropy(h, w, y, chunk_rows=chunk_rows)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@_TRITON
@pytest.mark.parametrize("N, V, chunk_rows", [(37, 53, 8), (20, 5000, 7), (5, 4096, None)])
@pytest.mark.parametrize("autocast, tol", [(False, 1e-5), (True, 1e-2)])
def test_triton_softmax_matches_the_pytorch_chunks(N, V, chunk_rows, autocast, tol):
    """Vocabularies below, across and at a multiple of the kernels' 2048-wide steps; ignored rows among them."""
    torch.manual_seed(N + V)
    hidden, weight, labels = _inputs(N=N, d=24, V=V)
    results = []
    for fn in (_fused(chunk_rows), _plain(chunk_rows)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(_loss_and_grads(fn, hidden, weight, labels))
    for name, a, b in zip(("loss", "d hidden", "d weight"), *results):
        assert a.dtype == b.dtype, name
        assert _rel(a, b) < tol, f"{name}: {_rel(a, b):.2e}"


@_TRITON
def test_triton_softmax_with_every_row_ignored_gives_zero_loss_and_gradients():
    hidden, weight, labels = _inputs()
    labels[:] = -100
    loss, grad_h, grad_w = _loss_and_grads(_fused(8), hidden, weight, labels)
    assert loss.item() == 0.0 and not grad_h.any() and not grad_w.any()


@_TRITON
def test_triton_softmax_comparison_fails_without_the_onehot_term(monkeypatch):
    """Sabotage: labels that the backward kernel never matches (the onehot term dropped) fail the comparison."""
    from hydralm.kernels.cross_entropy import triton_softmax

    hidden, weight, labels = _inputs()
    expected = _loss_and_grads(_plain(8), hidden, weight, labels)
    real = triton_softmax.softmax_minus_onehot_

    def no_onehot(logits, labels_c, lse, scale, ignore_index):
        far = torch.where(labels_c == ignore_index, labels_c, labels_c + logits.shape[1])  # valid, never a column
        return real(logits, far, lse, scale, ignore_index)

    monkeypatch.setattr(triton_softmax, "softmax_minus_onehot_", no_onehot)
    got = _loss_and_grads(_fused(8), hidden, weight, labels)
    assert _rel(got[0], expected[0]) < 1e-5  # the forward is untouched
    assert _rel(got[1], expected[1]) > 1e-2


@_TRITON
def test_the_triton_backend_runs_the_fused_chunks(monkeypatch):
    hidden, weight, labels = _inputs()
    monkeypatch.setenv("HYDRALM_CROSS_ENTROPY", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), _fused(None)(hidden, weight, labels))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="HYDRALM_CROSS_ENTROPY=triton needs"):
        linear_cross_entropy(hidden, weight, labels)  # a CPU tensor without the interpreter
