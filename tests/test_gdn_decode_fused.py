"""The fused Gated DeltaNet decode step (HYDRALM_DECODE=fused, kernels/delta_rule/triton_decode.py) against the
PyTorch step it replaces, on fresh random weights, states and inputs. Off GPU the kernel runs in Triton's CPU
interpreter (conftest.py). Tolerances: fp32 1e-5 relative to the largest value (the same formulas, other
summation order); bf16 2e-2 (roundings at other places)."""

import pytest
import torch

from hydralm import HydraConfig, HydraLM
from hydralm.kernels.triton_common import triton_available
from hydralm.modules.gated_deltanet import GatedDeltaNet

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")


def _layer(n_heads, head_dim, use_gate=True, norm_qk=True, kernel=4):
    cfg = HydraConfig(
        d_model=40, n_heads=n_heads, head_dim=head_dim, dn_use_gate=use_gate, dn_norm_qk=norm_qk,
        dn_short_conv_kernel=kernel, vocab_size=32,
    )  # fmt: skip
    layer = GatedDeltaNet(cfg)
    with torch.no_grad():  # non-trivial norm weights and decay parameters
        layer.out_norm.weight.uniform_(0.5, 1.5)
        layer.A_log.uniform_(-1, 1)
    return layer


def _state(layer, B, dtype=torch.float32):
    state = layer.init_state(B, dtype=dtype)
    state.S.normal_()
    state.conv.normal_()
    return state


def _steps(layer, xs, state, backend, monkeypatch):
    monkeypatch.setenv("HYDRALM_DECODE", backend)
    ys = []
    for x_t in xs:
        y, state = layer.step(x_t, state)
        ys.append(y)
    return torch.stack(ys), state


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize(
    "n_heads, head_dim, use_gate, norm_qk, kernel",
    [(2, 16, True, True, 4), (3, 24, False, True, 4), (2, 20, True, False, 2), (1, 64, True, True, 1)],
)
def test_fused_step_equals_the_pytorch_step_over_several_tokens(n_heads, head_dim, use_gate, norm_qk, kernel,
                                                                  monkeypatch):  # fmt: skip
    torch.manual_seed(0)
    layer = _layer(n_heads, head_dim, use_gate, norm_qk, kernel)
    state = _state(layer, B=2)
    xs = torch.randn(3, 2, 40)
    with torch.no_grad():
        y_ref, s_ref = _steps(layer, xs, state, "torch", monkeypatch)
        y, s = _steps(layer, xs, state, "fused", monkeypatch)
    assert _rel(y, y_ref) < 1e-5
    assert _rel(s.S, s_ref.S) < 1e-5
    assert s.conv.shape == s_ref.conv.shape and _rel(s.conv, s_ref.conv) < 1e-6 if kernel > 1 else True
    assert state.S.abs().max() > 0 and not torch.equal(state.S, s.S)  # the caller's state is left as it was


def test_the_comparison_fails_when_the_gate_is_off(monkeypatch):
    """Sabotage: a fused step with dt_bias moved by 0.05 (a wrong decay) is caught by the fp32 bound."""
    torch.manual_seed(1)
    layer = _layer(2, 16)
    state = _state(layer, B=2)
    xs = torch.randn(3, 2, 40)
    with torch.no_grad():
        y_ref, _ = _steps(layer, xs, state, "torch", monkeypatch)
        layer.dt_bias += 0.05
        y, _ = _steps(layer, xs, state, "fused", monkeypatch)
    assert _rel(y, y_ref) > 1e-4


def test_fused_step_in_bf16(monkeypatch):
    torch.manual_seed(2)
    layer = _layer(2, 32).to(torch.bfloat16)
    state = layer.init_state(2, dtype=torch.bfloat16)
    state.S.normal_()
    state.conv.normal_()
    xs = torch.randn(4, 2, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        y_ref, s_ref = _steps(layer, xs, state, "torch", monkeypatch)
        y, s = _steps(layer, xs, state, "fused", monkeypatch)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and s.S.dtype == torch.float32
    assert _rel(y, y_ref) < 2e-2 and _rel(s.S, s_ref.S) < 2e-2


def _two_deltanet_model() -> HydraLM:
    cfg = HydraConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=2, layer_types=["deltanet", "swa", "deltanet"],
                      swa_window=8, dn_chunk_size=8, initializer_range=0.2)  # fmt: skip
    return HydraLM(cfg).eval()


def _count_fused_kernel_calls(monkeypatch) -> list:
    import hydralm.kernels.delta_rule.triton_decode as fused

    calls, kernel = [], fused.gated_deltanet_step_fused
    monkeypatch.setattr(fused, "gated_deltanet_step_fused", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    return calls


def test_model_decoding_with_the_fused_step_gives_the_parallel_logits(monkeypatch):
    """C1 with the fused step: a model's step-by-step logits equal its parallel forward to 1e-4 (fp32)."""
    torch.manual_seed(3)
    model = _two_deltanet_model()
    ids = torch.randint(0, 50, (2, 6))
    monkeypatch.setenv("HYDRALM_DECODE", "fused")
    calls = _count_fused_kernel_calls(monkeypatch)
    with torch.no_grad():
        parallel = model(ids)["logits"]
        state, steps = model.init_state(2), []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    assert (torch.stack(steps, 1) - parallel).abs().max() < 1e-4
    assert len(calls) == 2 * ids.shape[1]  # both DeltaNet layers took the fused step at every token


def test_the_fused_step_compiles_in_one_graph(monkeypatch):
    """A custom op: the StaticDecoder's torch.compile(fullgraph=True) keeps it as one call (aot_eager here; the
    CUDA graph on a GPU is `HYDRALM_DECODE=fused python -m benchmarks.gpu_check static_decode`)."""
    torch.manual_seed(4)
    layer = _layer(2, 16)
    state = _state(layer, B=2)
    x_t = torch.randn(2, 40)
    monkeypatch.setenv("HYDRALM_DECODE", "fused")
    with torch.no_grad():
        eager_y, eager_state = layer.step(x_t, state)
        compiled_y, compiled_state = torch.compile(layer.step, fullgraph=True, backend="aot_eager")(x_t, state)
    assert torch.equal(compiled_y, eager_y) and torch.equal(compiled_state.S, eager_state.S)


def _many(layer, x, state, backend, monkeypatch):
    monkeypatch.setenv("HYDRALM_DECODE_MANY", backend)
    y, trail = layer.step_many(x, state)
    return y, [layer.state_after(state, trail, kept) for kept in range(1, x.shape[1] + 1)]


@pytest.mark.parametrize(
    "n_heads, head_dim, use_gate, norm_qk, kernel", [(2, 16, True, True, 4), (3, 24, False, False, 1)]
)
def test_fused_multi_token_step_equals_the_pytorch_one(n_heads, head_dim, use_gate, norm_qk, kernel, monkeypatch):
    """step_many (speculative verification) through the fused kernel: outputs, and the state after every prefix
    (state_after), as the PyTorch loop gives them."""
    torch.manual_seed(5)
    layer = _layer(n_heads, head_dim, use_gate, norm_qk, kernel)
    state = _state(layer, B=2)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        y_ref, after_ref = _many(layer, x, state, "torch", monkeypatch)
        y, after = _many(layer, x, state, "fused", monkeypatch)
    assert _rel(y, y_ref) < 1e-5
    for s, s_ref in zip(after, after_ref):
        assert _rel(s.S, s_ref.S) < 1e-5 and torch.equal(s.conv, s_ref.conv)


def test_the_multi_token_comparison_fails_when_the_conv_cache_is_not_carried(monkeypatch):
    """Sabotage: a fused step_many that feeds every token the call's first conv cache is caught."""
    torch.manual_seed(6)
    layer = _layer(2, 16)
    state = _state(layer, B=2)
    x = torch.randn(2, 3, 40)
    kernel = layer._fused_kernel
    with torch.no_grad():
        y_ref, _ = _many(layer, x, state, "torch", monkeypatch)
        monkeypatch.setattr(layer, "_fused_kernel", lambda p, cache, S, dtype: kernel(p, state.conv, S, dtype))
        y, _ = _many(layer, x, state, "fused", monkeypatch)
    assert _rel(y, y_ref) > 1e-4


def test_model_verification_with_the_fused_multi_token_step(monkeypatch):
    """HydraLM.decode_many (what speculative decoding verifies with) takes the fused step in every DeltaNet layer
    and gives the PyTorch loop's logits and kept states (which equal decode steps: tests/test_decode_many.py)."""
    torch.manual_seed(7)
    model = _two_deltanet_model()
    calls = _count_fused_kernel_calls(monkeypatch)
    ids = torch.randint(0, 50, (2, 3))
    results = {}
    with torch.no_grad():
        state = model(torch.randint(0, 50, (2, 5)), return_state=True)["state"]
        for backend in ("torch", "fused"):
            monkeypatch.setenv("HYDRALM_DECODE_MANY", backend)
            logits, trail, _ = model.decode_many(ids, state)
            results[backend] = (logits, model.state_after(state, trail, 2))
    assert (results["fused"][0] - results["torch"][0]).abs().max() < 1e-5
    for layer in (0, 2):
        assert _rel(results["fused"][1][layer].S, results["torch"][1][layer].S) < 1e-5
    assert len(calls) == 2 * ids.shape[1]  # both DeltaNet layers, every token, only in the fused run


@pytest.mark.parametrize("use_gate, kernel", [(True, 4), (False, 2), (True, 1)])
def test_in_place_step_equals_the_functional_one(use_gate, kernel, monkeypatch):
    """On a state marked in_place (a StaticDecoder's buffers) the fused step writes the new S and conv cache into
    the given tensors: the same bits as the functional step's new tensors, at the same addresses."""
    torch.manual_seed(8)
    layer = _layer(2, 16, use_gate=use_gate, kernel=kernel)
    state = _state(layer, B=2)
    owned = state.clone()
    owned.in_place = True
    xs = torch.randn(3, 2, 40)
    with torch.no_grad():
        y_ref, s_ref = _steps(layer, xs, state, "fused", monkeypatch)
        addresses = (owned.S.data_ptr(), owned.conv.data_ptr())
        ys = []
        for x_t in xs:
            y, new = layer.step(x_t, owned)
            assert new.S is owned.S and new.conv is owned.conv
            ys.append(y)
    assert torch.equal(torch.stack(ys), y_ref)
    assert torch.equal(owned.S, s_ref.S) and torch.equal(owned.conv, s_ref.conv)
    assert (owned.S.data_ptr(), owned.conv.data_ptr()) == addresses


def test_static_decoder_steps_update_its_buffers_in_place(monkeypatch):
    """A StaticDecoder's DeltaNet buffers advance in place and stay equal to model.step's states; the comparison
    fails when the in-place kernel drops its writes (sabotage)."""
    import hydralm.kernels.delta_rule.triton_decode as fused
    from hydralm.static_decode import StaticDecoder

    torch.manual_seed(9)
    model = _two_deltanet_model()
    monkeypatch.setenv("HYDRALM_DECODE", "fused")
    ids = torch.randint(0, 50, (4, 2))

    def decode(decoder, state):
        for t in range(ids.shape[0]):
            logits, state = model.step(ids[t], state)
            assert (decoder.step(ids[t]) - logits).abs().max() < 1e-5
        return state

    with torch.no_grad():
        state = model(torch.randint(0, 50, (2, 5)), return_state=True)["state"]
        decoder = StaticDecoder(model, state)
        address = decoder.state[0].S.data_ptr()
        state = decode(decoder, state)
        assert decoder.state[0].S.data_ptr() == address
        assert torch.equal(decoder.state[0].S, state[0].S) and torch.equal(decoder.state[2].conv, state[2].conv)
        kernel = fused.gated_deltanet_step_fused_

        def dropped_writes(proj, cache, conv_weight, A_log, dt_bias, S, *rest):  # the kernel writes into copies
            return kernel(proj, cache.clone(), conv_weight, A_log, dt_bias, S.clone(), *rest)

        monkeypatch.setattr(fused, "gated_deltanet_step_fused_", dropped_writes)
        with pytest.raises(AssertionError):
            decode(StaticDecoder(model, state), state)


@pytest.mark.parametrize(
    "n_heads, head_dim, use_gate, norm_qk, kernel, tokens",
    [(2, 16, True, True, 4, 3), (3, 24, False, True, 2, 5), (2, 20, True, False, 1, 2), (1, 16, True, True, 4, 1)],
)
def test_looped_multi_token_step_equals_the_per_token_launches(n_heads, head_dim, use_gate, norm_qk, kernel, tokens,
                                                                 monkeypatch):  # fmt: skip
    """HYDRALM_DECODE_MANY=looped (the T tokens in one launch) gives what T launches of the fused step give, bit for
    bit: outputs, and the state after every prefix; windows that reach back into the conv cache and past it."""
    torch.manual_seed(10)
    layer = _layer(n_heads, head_dim, use_gate, norm_qk, kernel)
    state = _state(layer, B=2)
    x = torch.randn(2, tokens, 40)
    with torch.no_grad():
        y_ref, after_ref = _many(layer, x, state, "fused", monkeypatch)
        y, after = _many(layer, x, state, "looped", monkeypatch)
    assert torch.equal(y, y_ref)
    for s, s_ref in zip(after, after_ref):
        assert torch.equal(s.S, s_ref.S) and torch.equal(s.conv, s_ref.conv)


def test_the_looped_comparison_fails_when_the_conv_cache_is_dropped(monkeypatch):
    """Sabotage: the looped kernel fed a zero conv cache (the tokens' windows lose their first inputs) is caught."""
    import hydralm.kernels.delta_rule.triton_decode as fused

    torch.manual_seed(11)
    layer = _layer(2, 16)
    state = _state(layer, B=2)
    x = torch.randn(2, 3, 40)
    kernel = fused.gated_deltanet_steps_fused
    with torch.no_grad():
        y_ref, _ = _many(layer, x, state, "fused", monkeypatch)
        monkeypatch.setattr(fused, "gated_deltanet_steps_fused", lambda proj, cache, *a: kernel(proj, 0 * cache, *a))
        y, _ = _many(layer, x, state, "looped", monkeypatch)
    assert _rel(y, y_ref) > 1e-4


def test_looped_verification_compiles_in_one_graph(monkeypatch):
    """decode_many with the looped kernel under torch.compile(fullgraph=True) (aot_eager): the same logits."""
    torch.manual_seed(12)
    model = _two_deltanet_model()
    monkeypatch.setenv("HYDRALM_DECODE_MANY", "looped")
    ids = torch.randint(0, 50, (2, 3))
    with torch.no_grad():
        state = model(torch.randint(0, 50, (2, 5)), return_state=True)["state"]
        eager, _, _ = model.decode_many(ids, state)
        compiled, _, _ = torch.compile(model.decode_many, fullgraph=True, backend="aot_eager")(ids, state)
        monkeypatch.setenv("HYDRALM_DECODE_MANY", "torch")
        reference, _, _ = model.decode_many(ids, state)
    assert torch.equal(compiled, eager) and _rel(eager, reference) < 1e-5
