"""The lean Gated DeltaNet block: old checkpoints load into the fused projection, the memory-lean gated RMSNorm
matches the plain expression, and the fla-module wiring matches the PyTorch path (fla itself: benchmarks/gpu_check)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import stored_bytes

from hydralm import HydraConfig, HydraLM
from hydralm.modules import gated_deltanet, short_conv
from hydralm.modules import rmsnorm as rmsnorm_module
from hydralm.modules.gated_deltanet import GatedDeltaNet
from hydralm.modules.rmsnorm import GatedRMSNorm, RMSNorm

LEGACY = Path(__file__).parent / "data" / "gdn_legacy_layout.pt"


@pytest.mark.parametrize("name", ["gated", "ungated"])
def test_state_dict_in_the_old_layout_loads_and_gives_the_same_logits(name):
    """Saved by the model with separate qkv / a_proj / b_proj / gate projections (with its logits)."""
    saved = torch.load(LEGACY, weights_only=True)[name]
    assert "blocks.0.mixer.qkv.weight" in saved["state_dict"]
    model = HydraLM(HydraConfig.from_dict(saved["config"])).eval()
    model.load_state_dict(saved["state_dict"], strict=True)
    with torch.no_grad():
        logits = model(saved["input_ids"])["logits"]
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-5)
    assert "blocks.0.mixer.in_proj.weight" in model.state_dict()


def test_a_partial_old_layout_is_refused_by_strict_loading():
    saved = torch.load(LEGACY, weights_only=True)["gated"]
    state = dict(saved["state_dict"])
    del state["blocks.0.mixer.gate.weight"]
    with pytest.raises(RuntimeError, match="in_proj.weight"):
        HydraLM(HydraConfig.from_dict(saved["config"])).load_state_dict(state, strict=True)


def _gated_norm_case(dtype=torch.float64):
    x = torch.randn(3, 5, 2, 16, dtype=dtype, requires_grad=True)
    gate = torch.randn(3, 5, 2, 16, dtype=dtype, requires_grad=True)
    norm = GatedRMSNorm(16).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(16, dtype=dtype))
    upstream = torch.randn(3, 5, 2, 16, dtype=dtype)
    return norm, x, gate, upstream


def _value_and_grads(fn, norm, x, gate, upstream):
    y = fn(x, gate)
    return (y, *torch.autograd.grad((y * upstream).sum(), (x, gate, norm.weight)))


def test_lean_gated_rmsnorm_matches_the_plain_expression_and_its_gradients():
    norm, x, gate, upstream = _gated_norm_case()
    expected = _value_and_grads(norm.reference, norm, x, gate, upstream)
    got = _value_and_grads(norm, norm, x, gate, upstream)
    for name, a, b in zip(("y", "dx", "dgate", "dweight"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    # bf16 in, bf16 out, computed in fp32: close to the fp64 answer
    low = [t.detach().bfloat16().requires_grad_() for t in (x, gate)]
    y = norm.float()(*low)
    assert y.dtype == torch.bfloat16
    assert ((y.double() - expected[0]).norm() / expected[0].norm()) < 1e-2


def test_lean_rmsnorm_matches_the_plain_expression_and_keeps_no_fp32_copy():
    """The blocks' RMSNorm in training: the same value and gradients as the plain expression (fp64), and from an
    fp32 residual stream it stores x and 1 / rms only (the plain expression also keeps x / rms, (..., d) fp32)."""
    norm = RMSNorm(16).double()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(16, dtype=torch.float64))
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(norm(x), norm.reference(x), rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad((norm(x) * upstream).sum(), (x, norm.weight))
    expected = torch.autograd.grad((norm.reference(x) * upstream).sum(), (x, norm.weight))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    norm = norm.float()
    x32 = x.detach().float().requires_grad_()
    assert stored_bytes(lambda: norm.reference(x32)) - stored_bytes(lambda: norm(x32)) >= x.numel() * 4


def test_lean_gated_rmsnorm_sabotage_is_caught(monkeypatch):
    """Dropping the mean term of the normalisation's backward must fail the gradient comparison."""
    norm, x, gate, upstream = _gated_norm_case()
    expected = _value_and_grads(norm.reference, norm, x, gate, upstream)
    real_mean, real_function = torch.Tensor.mean, rmsnorm_module._RMSNormFunction

    class Sabotaged(real_function):
        @staticmethod
        def backward(ctx, grad_y):
            torch.Tensor.mean = lambda self, *a, **k: real_mean(self, *a, **k) * 0
            try:
                return real_function.backward(ctx, grad_y)
            finally:
                torch.Tensor.mean = real_mean

    monkeypatch.setattr(rmsnorm_module, "_RMSNormFunction", Sabotaged)
    got = _value_and_grads(norm, norm, x, gate, upstream)
    assert not torch.allclose(got[1], expected[1], rtol=1e-6, atol=1e-8)


def _torch_stand_ins(monkeypatch):
    """The fla wrappers replaced by PyTorch functions of the same contract, so the wiring runs on a CPU."""

    def conv(x, weight):
        full = F.pad(x, (0, 0, weight.shape[-1] - 1, 0))
        return F.silu(F.conv1d(full.transpose(1, 2), weight, groups=x.shape[-1]).transpose(1, 2))

    monkeypatch.setattr(gated_deltanet, "gdn_modules_backend", lambda is_cuda: "fla")
    monkeypatch.setattr(gated_deltanet, "short_conv_backend", lambda is_cuda: "fla")
    monkeypatch.setattr(short_conv, "fla_short_conv", conv)
    monkeypatch.setattr(gated_deltanet, "fla_l2norm", lambda x, eps: F.normalize(x, dim=-1, eps=eps))
    monkeypatch.setattr(
        gated_deltanet,
        "fla_gated_rms_norm",
        lambda x, gate, weight, eps: rmsnorm_module._RMSNormFunction.apply(x, gate, weight, eps),
    )


@pytest.mark.parametrize("N", [2, 13])  # shorter and longer than the conv's cache (kernel 4: 3 rows)
def test_fla_module_wiring_gives_the_torch_outputs_state_and_gradients(monkeypatch, N):
    cfg = HydraConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=2, dn_chunk_size=4, layer_types=["deltanet"])
    layer = GatedDeltaNet(cfg)
    x = torch.randn(2, N, 32, requires_grad=True)
    y, state = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    _torch_stand_ins(monkeypatch)
    y_fla, state_fla = layer(x)
    grads_fla = torch.autograd.grad(y_fla.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y_fla, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state_fla.conv, state.conv, rtol=0, atol=0)
    torch.testing.assert_close(state_fla.S, state.S, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_fla, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_short_conv_training_path_recomputes_the_conv_and_gives_autograds_gradients():
    """ShortConv with autograd keeps x, the cache and the weight only (the padded input and the conv output are
    recomputed in backward): the same outputs and gradients as the plain ops (fp64, to 1e-12), and it stores the
    padded input and the conv output no more (in the layer x is a view of the input projection's output, which
    backward keeps anyway)."""
    from hydralm.modules.short_conv import ShortConv, _conv_silu

    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    cache = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 9, 6, dtype=torch.float64)
    y, _ = conv(x, cache)
    plain = _conv_silu(torch.cat([cache, x], dim=1), conv.weight)
    torch.testing.assert_close(y, plain, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(y, (x, cache, conv.weight), upstream),
                    torch.autograd.grad(plain, (x, cache, conv.weight), upstream)):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    saved = stored_bytes(lambda: _conv_silu(torch.cat([cache, x], dim=1), conv.weight)) - stored_bytes(
        lambda: conv(x, cache)
    )
    full, conv_out, own = 2 * 12 * 6 * 8, 2 * 9 * 6 * 8, x.numel() * 8 + cache.numel() * 8  # bytes, fp64
    assert saved == full + conv_out - own


def test_rmsnorm_under_autocast_keeps_the_fp32_residual_in_bf16_with_bf16_accurate_gradients():
    """Under bf16 autocast the fp32 residual stream a block norm reads is kept in bf16 for backward (2 bytes per
    value less), and the output is bf16 (what the projection after it reads); the output and the gradients stay
    within bf16's error of the fp64 expression."""
    torch.manual_seed(0)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64))
    x = (3 * torch.randn(4, 8, 64)).requires_grad_()
    upstream = torch.randn(4, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
        kept = stored_bytes(lambda: norm(x))
    assert y.dtype == torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        kept_fp32 = stored_bytes(lambda: norm(x))
    assert kept_fp32 - kept == x.numel() * 2
    got = torch.autograd.grad((y * upstream).sum(), (x, norm.weight))
    norm64, x64 = RMSNorm(64).double(), x.detach().double().requires_grad_()
    with torch.no_grad():
        norm64.weight.copy_(norm.weight)
    torch.testing.assert_close(y.double(), norm64.reference(x64), rtol=4e-3, atol=1e-6)  # one bf16 rounding
    expected = torch.autograd.grad((norm64.reference(x64) * upstream.double()).sum(), (x64, norm64.weight))
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32 and ((a.double() - b).norm() / b.norm()) < 1e-2


@pytest.mark.parametrize("norm_qk", [True, False])
def test_packed_qkv_with_q_and_k_normalised_in_the_kernels_gives_the_layers_outputs_and_gradients(monkeypatch, norm_qk):
    """HYDRALM_DELTANET_PACKED=1 hands q, k, v to the fused kernels as the conv's one tensor, q and k raw: the
    layer's outputs, state and every gradient are those of the layer splitting and normalising them itself
    (F.normalize on a CPU: x / max(|x|, eps) against the kernels' x / sqrt(|x|^2 + eps), ~1e-6 apart here)."""
    monkeypatch.setenv("HYDRALM_DELTANET", "fused")
    cfg = HydraConfig(
        vocab_size=8, d_model=32, n_layers=1, n_heads=2, dn_chunk_size=16, layer_types=["deltanet"], dn_norm_qk=norm_qk
    )
    layer = GatedDeltaNet(cfg)
    x = torch.randn(2, 37, 32, requires_grad=True)
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("HYDRALM_DELTANET_PACKED", flag)
        y, state = layer(x)
        results.append([y, state.S, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
