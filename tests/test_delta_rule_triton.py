"""The Triton kernels against the PyTorch loop and the recurrence: the pass over chunks
(kernels/delta_rule/triton_state_pass.py, backend "triton") and the fully fused layer
(kernels/delta_rule/triton_fused.py, backend "fused").

Off GPU these run in Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest.py), which executes the
kernels' own code with IEEE fp32 dots. On a GPU the same checks, plus TF32/bf16 ones, are
`python -m benchmarks.gpu_check`.
"""

import pytest
import torch
import torch.nn.functional as F

from hydralm import HydraConfig, HydraLM
from hydralm.kernels.delta_rule import delta_rule_chunkwise, delta_rule_recurrent
from hydralm.kernels.delta_rule.chunk import state_pass_torch
from hydralm.kernels.delta_rule.reference import l2_normalize
from hydralm.kernels.delta_rule.triton_state_pass import state_pass_triton
from hydralm.kernels.triton_common import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")


def _inputs(B, H, T, dk, dv):
    q, k = (F.normalize(torch.randn(B, H, T, dk, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, dv, dtype=torch.float64)
    g = -torch.rand(B, H, T, dtype=torch.float64) * 0.7
    beta = torch.rand(B, H, T, dtype=torch.float64)
    s0 = torch.randn(B, H, dk, dv, dtype=torch.float64)
    return [q, k, v, g, beta, s0]


def _outputs_and_grads(fn, inputs, with_state):
    """Output, final state and the gradients of a fixed random projection of both."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    o, s = fn(*inputs[:5], initial_state=inputs[5] if with_state else None)
    gen = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)).sum()
    loss.backward()
    n_grads = 6 if with_state else 5
    return [o.double(), s.double()] + [t.grad.double() for t in inputs[:n_grads]]


# Shapes include non-power-of-two chunk / head sizes (masked tiles) and T not a multiple of the chunk.
@pytest.mark.parametrize("backend", ["triton", "fused", "fused 16-wide blocks"])
@pytest.mark.parametrize(
    "B,H,T,dk,dv,chunk,with_state",
    [
        (2, 3, 70, 20, 12, 16, True),
        (1, 2, 64, 32, 40, 12, False),
        (1, 1, 5, 8, 8, 64, True),
    ],
)
def test_triton_chunkwise_matches_the_recurrence_in_outputs_and_all_gradients(
    B, H, T, dk, dv, chunk, with_state, backend, monkeypatch
):
    if backend == "fused 16-wide blocks":  # the fused kernels' loops over d_k / d_v blocks take several steps
        from hydralm.kernels.delta_rule import triton_fused as delta_rule_fused

        monkeypatch.setattr(delta_rule_fused, "BLOCK_V", 16)
        monkeypatch.setattr(delta_rule_fused, "BLOCK_K", 16)
        backend = "fused"
    inputs = _inputs(B, H, T, dk, dv)
    expected = _outputs_and_grads(delta_rule_recurrent, inputs, with_state)  # fp64, token by token
    fp32 = [t.float() for t in inputs]
    got = _outputs_and_grads(
        lambda *a, **kw: delta_rule_chunkwise(*a, **kw, chunk_size=chunk, backend=backend), fp32, with_state
    )
    for name, g, e in zip(["o", "state", "dq", "dk", "dv", "dg", "dbeta", "ds0"], got, expected):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=2e-4, msg=lambda m: f"{name}: {m}")


def test_fused_recompute_gives_the_same_outputs_and_gradients_and_stores_less(monkeypatch):
    """HYDRALM_DELTANET_RECOMPUTE=1 rebuilds the per-chunk factors and states in backward with the same kernels:
    bit-identical outputs and gradients (the path above is checked against the recurrence), and it no longer
    stores the five fp32 per-chunk tensors."""
    from helpers import stored_bytes

    B, H, T, K, V, C, n = 1, 2, 40, 8, 12, 16, 3  # 40 tokens in 3 chunks of 16
    inputs = [t.float() for t in _inputs(B, H, T, K, V)]

    def fused(*a, **kw):
        return delta_rule_chunkwise(*a, **kw, chunk_size=C, backend="fused")

    results, stored = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv("HYDRALM_DELTANET_RECOMPUTE", flag)
        results[flag] = _outputs_and_grads(fused, inputs, with_state=True)
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        stored[flag] = stored_bytes(lambda: fused(*leaves[:5], initial_state=leaves[5]))
    for saved, rebuilt in zip(results["0"], results["1"]):
        assert torch.equal(saved, rebuilt)
    per_chunk = B * H * n * 4 * (C * C + 2 * C * K + K * V + C * V + 1)  # X, W, Kd, states, delta, a (fp32)
    assert stored["0"] - stored["1"] == per_chunk - B * H * K * V * 4  # the initial state is kept instead


def test_fused_blocked_inverse_matches_the_recurrence_and_the_substitution(monkeypatch):
    """HYDRALM_DELTANET_BLOCKED_INVERSE=1 (chunk 64: (I + A)^-1 in 16 x 16 blocks) gives the recurrence's outputs
    and gradients, and the one-row-per-step substitution's within fp32 rounding. Weak decay (g in (-0.05, 0)), so
    the blocks below the diagonal carry real weight: a wrong term of the block recurrence fails this."""
    inputs = _inputs(1, 2, 150, 16, 24)
    inputs[3] = inputs[3] * (0.05 / 0.7)
    expected = _outputs_and_grads(delta_rule_recurrent, inputs, with_state=True)
    fp32 = [t.float() for t in inputs]

    def fused(*a, **kw):
        return delta_rule_chunkwise(*a, **kw, chunk_size=64, backend="fused")

    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("HYDRALM_DELTANET_BLOCKED_INVERSE", flag)
        results[flag] = _outputs_and_grads(fused, fp32, with_state=True)
    names = ["o", "state", "dq", "dk", "dv", "dg", "dbeta", "ds0"]
    for name, blocked, substituted, e in zip(names, results["1"], results["0"], expected):
        torch.testing.assert_close(blocked, e, atol=2e-4, rtol=2e-4, msg=lambda m: f"{name} vs recurrence: {m}")
        torch.testing.assert_close(blocked, substituted, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tile", [16, 32, 64])
def test_triton_state_pass_equals_the_pytorch_loop_with_partial_gradients(tile, monkeypatch):
    """Gradients arriving only through some outputs (None for the others) are handled like autograd does; every
    state-tile width the GPU autotuner may pick (V = 40 is not a multiple of any: masked columns)."""
    from hydralm.kernels.delta_rule import triton_state_pass as dt

    for kernel in (dt._state_pass_fwd_kernel, dt._state_pass_bwd_kernel):
        monkeypatch.setattr(kernel, "configs", [dt.triton.Config({"BV": tile}, num_warps=4, num_stages=1)])
    B, H, n, C, K, V = 2, 2, 5, 16, 24, 40
    U, W, Kd = torch.randn(B, H, n, C, V), torch.randn(B, H, n, C, K) * 0.1, torch.randn(B, H, n, C, K) * 0.1
    a, S0 = torch.rand(B, H, n), torch.randn(B, H, K, V)
    results = []
    for fn in (state_pass_torch, state_pass_triton):
        leaves = [t.clone().requires_grad_() for t in (U, W, Kd, a, S0)]
        states, delta, final = fn(*leaves)
        (states.sum() + 2 * delta.pow(2).sum()).backward()  # the final state gets no gradient
        results.append([states, delta, final] + [t.grad for t in leaves])
    for got, expected in zip(*reversed(results)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _state_pass_results(fn, U, W, Kd, a, S0):
    """Outputs and every gradient of a loss that reads H, delta and the final state."""
    leaves = [t.clone().requires_grad_() for t in (U, W, Kd, a, S0)]
    states, delta, final = fn(*leaves)
    (states.sum() + 2 * delta.pow(2).sum() + (final * 0.5).pow(2).sum()).backward()
    return [states, delta, final] + [t.grad for t in leaves]


def _state_pass_inputs(B=2, H=2, n=7, C=16, K=24, V=40):
    U, W, Kd = torch.randn(B, H, n, C, V), torch.randn(B, H, n, C, K) * 0.1, torch.randn(B, H, n, C, K) * 0.1
    return U, W, Kd, torch.rand(B, H, n), torch.randn(B, H, K, V)


@pytest.mark.parametrize("seg_len", [1, 2, 3, 7])
def test_segmented_state_pass_equals_the_pytorch_loop(seg_len, monkeypatch):
    """The pass cut into segments (each segment's affine map, the maps applied in order, then every segment
    from its entering state), forward and backward: 7 chunks in segments of 1, 2, 3 (a ragged last one) and
    7 (one walk) give the PyTorch loop's outputs and gradients, the final state's included."""
    from hydralm.kernels.delta_rule import triton_state_pass as dt

    monkeypatch.setattr(dt, "SEGMENT_CHUNKS", seg_len)
    inputs = _state_pass_inputs()
    expected = _state_pass_results(state_pass_torch, *inputs)
    got = _state_pass_results(state_pass_triton, *inputs)
    for name, g, e in zip(["H", "delta", "final", "dU", "dW", "dKd", "da", "dS0"], got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_segmented_state_pass_comparison_fails_when_the_segments_start_from_zero(monkeypatch):
    """The check above can fail: segments that all start from a zero state (the maps' scan dropped)."""
    from hydralm.kernels.delta_rule import triton_state_pass as dt

    monkeypatch.setattr(dt, "SEGMENT_CHUNKS", 2)
    zeros = lambda maps, S0, reverse, precision: torch.zeros_like(maps[..., : -maps.shape[-2]])  # noqa: E731
    monkeypatch.setattr(dt, "_scan_segments", zeros)
    inputs = _state_pass_inputs()
    expected, got = (_state_pass_results(fn, *inputs) for fn in (state_pass_torch, state_pass_triton))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)


def test_fused_delta_rule_with_a_segmented_pass_matches_the_recurrence(monkeypatch):
    """The fused layer kernels over a segmented pass (segments of 2 chunks of 16 tokens, the last ragged)."""
    from hydralm.kernels.delta_rule import triton_state_pass as dt

    monkeypatch.setattr(dt, "SEGMENT_CHUNKS", 2)
    inputs = _inputs(2, 3, 70, 20, 12)
    expected = _outputs_and_grads(delta_rule_recurrent, inputs, True)
    fused = lambda *a, **kw: delta_rule_chunkwise(*a, **kw, chunk_size=16, backend="fused")  # noqa: E731
    got = _outputs_and_grads(fused, [t.float() for t in inputs], True)
    for name, g, e in zip(["o", "state", "dq", "dk", "dv", "dg", "dbeta", "ds0"], got, expected):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=2e-4, msg=lambda m: f"{name}: {m}")


def test_segments_are_cut_only_for_long_walks_over_few_sequences():
    from hydralm.kernels.delta_rule.triton_state_pass import segment_chunks

    assert segment_chunks(1024, 12) == 32  # 64k tokens x 12 heads: 32 segments of 32 chunks
    assert segment_chunks(256, 48) == 256  # 16k x 4 x 12 heads: sequences enough, one walk
    assert segment_chunks(256, 24) == 32  # 16k x 2 x 12 heads: 8 segments
    assert segment_chunks(64, 192) == 64  # 4k x 16 x 12 heads: programs enough, one walk
    assert segment_chunks(40, 1) == 40  # short: one walk


def test_fused_reads_strided_bf16_inputs_like_the_layer_passes_them():
    """The layer hands q, k, v over as (B, T, H, D) views transposed to (B, H, T, D), in bf16 under autocast:
    the fused kernels read them in place and give what the PyTorch kernel gives on the same bf16 values."""
    B, T, H, D = 2, 50, 3, 16
    base = torch.randn(B, T, 3, H, D).bfloat16()
    base[:, :, :2] = F.normalize(base[:, :, :2].float(), dim=-1).bfloat16()
    g, beta = -torch.rand(B, H, T) * 0.5, torch.rand(B, H, T)
    do = torch.randn(B, H, T, D)
    results = []
    for backend in ("fused", "torch"):
        qkv = base.clone().requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # strided views, as in the layer
        gates = [t.clone().requires_grad_() for t in (g, beta)]
        o, state = delta_rule_chunkwise(q, k, v, *gates, chunk_size=16, backend=backend)
        (o.float() * do).sum().backward()
        results.append([o.float(), state] + [qkv.grad.float()] + [t.grad for t in gates])
    for name, got, expected in zip(["o", "state", "dqkv", "dg", "dbeta"], *results):
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2, msg=lambda m: f"{name}: {m}")


def test_sixteen_bit_dots_stay_within_half_precision_of_the_pytorch_kernel(monkeypatch):
    """HYDRALM_DELTANET_DOT16=1 (opt-in): with 16-bit inputs the fused kernels round their dots' operands to the
    inputs' type and accumulate in fp32, as fla's kernels do. fp16 here (Triton's interpreter computes bf16 dots
    wrongly): outputs and gradients stay within half precision of the PyTorch kernel on the same values, and
    differ from the default dots' (the switch reached the kernels); fp32 inputs keep fp32 dots."""
    from hydralm.kernels.delta_rule.triton_fused import kernel_constants

    B, H, T, D = 1, 2, 100, 32  # two 64-token chunks (the blocked inverse), the second ragged
    inputs = [t.half() if i < 3 else t.float() for i, t in enumerate(_inputs(B, H, T, D, D))]
    do = torch.randn(B, H, T, D)

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in inputs[:5]]
        o, state = delta_rule_chunkwise(*leaves, chunk_size=64, backend=backend)
        (o.float() * do).sum().backward()
        return [o.float(), state] + [t.grad.float() for t in leaves]

    default = run("fused")
    monkeypatch.setenv("HYDRALM_DELTANET_DOT16", "1")
    assert kernel_constants(64, D, D, dtype=torch.bfloat16)["PRECISION"] == "bf16"
    assert kernel_constants(64, D, D, dtype=torch.float32)["PRECISION"] in ("ieee", "tf32")
    sixteen, expected = run("fused"), run("torch")
    for name, got, want, before in zip(["o", "state", "dq", "dk", "dv", "dg", "dbeta"], sixteen, expected, default):
        torch.testing.assert_close(got, want, atol=3e-3, rtol=3e-3, msg=lambda m: f"{name}: {m}")  # fp16: ~5e-4
        if name in ("o", "dq", "dv"):
            assert not torch.equal(got, before), f"{name}: the 16-bit dots gave the default dots' result"


def test_fused_gradients_through_the_final_state_alone():
    """A chunk's output unused (its gradient None, as in a prefill that keeps only the state): the fused
    backward still gives the PyTorch kernel's gradients, and zeros for q."""
    inputs = _inputs(1, 2, 40, 16, 16)
    results = []
    for backend in ("torch", "fused"):
        leaves = [t.float().requires_grad_() for t in inputs]
        _, state = delta_rule_chunkwise(*leaves[:5], initial_state=leaves[5], chunk_size=16, backend=backend)
        state.pow(2).sum().backward()
        results.append([torch.zeros_like(t) if t.grad is None else t.grad for t in leaves])
    for name, got, expected in zip(["dq", "dk", "dv", "dg", "dbeta", "ds0"], results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["triton", "fused"])
def test_model_trains_the_same_with_the_triton_and_torch_deltanet(monkeypatch, backend):
    cfg = HydraConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        layer_types=["deltanet", "deltanet"],
        dn_chunk_size=16,
        initializer_range=0.2,
    )
    model = HydraLM(cfg)
    ids = torch.randint(0, 64, (2, 40))
    grads = {}
    for choice in ("torch", backend):
        monkeypatch.setenv("HYDRALM_DELTANET", choice)
        model.zero_grad()
        loss = F.cross_entropy(model(ids)["logits"][:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads[choice] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads[backend][0], grads["torch"][0], atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads[backend][1], grads["torch"][1]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_fused_backward_called_inside_autocast_gives_the_same_gradients():
    """Autograd runs backward under the caller's autocast state: a `loss.backward()` written inside the
    `torch.autocast` block must not turn the fused kernels' fp32 bookkeeping matmuls into bf16 ones (on a GPU
    that made the backward fail to compile: a bf16 dW tile against fp32 keys). The PyTorch kernels' own
    gradients do change there, as any autograd graph's do: PyTorch autocasts backward ops too."""
    inputs = _inputs(1, 2, 40, 16, 16)
    results = []
    for inside in (False, True):
        leaves = [t.float().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, state = delta_rule_chunkwise(*leaves[:5], initial_state=leaves[5], chunk_size=16, backend="fused")
            loss = o.float().pow(2).sum() + state.pow(2).sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        results.append([t.grad for t in leaves])
    for name, got, expected in zip(["dq", "dk", "dv", "dg", "dbeta", "ds0"], results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "K,C",
    [(20, 64), (64, 16), (80, 16)],  # masked d_k with the blocked inverse; a full 64-wide tile; d_k over one tile
)
def test_fused_l2_norm_of_raw_q_and_k_matches_normalising_first(K, C):
    """qk_l2norm_eps: the fused kernels normalise the rows of the raw q and k they load (d_k <= 64; wider heads
    are normalised in PyTorch first) and take the gradients back to the raw q and k. Raw rows of norm far from 1,
    so a missing term of the norm's gradient fails this."""
    B, H, T, V = 1, 2, 150, 24
    q, k = torch.randn(B, H, T, K) * 3, torch.randn(B, H, T, K) * 0.5
    v, s0 = torch.randn(B, H, T, V), torch.randn(B, H, K, V)
    g, beta = -torch.rand(B, H, T) * 0.1, torch.rand(B, H, T)

    def normalised_first(q, k, *rest, **kw):
        return delta_rule_chunkwise(l2_normalize(q, 1e-6), l2_normalize(k, 1e-6), *rest, **kw, chunk_size=C)

    expected = _outputs_and_grads(normalised_first, [q, k, v, g, beta, s0], with_state=True)
    for backend in ("fused", "torch"):
        got = _outputs_and_grads(
            lambda *a, **kw: delta_rule_chunkwise(*a, **kw, chunk_size=C, backend=backend, qk_l2norm_eps=1e-6),
            [q, k, v, g, beta, s0],
            with_state=True,
        )
        for name, a, e in zip(["o", "state", "dq", "dk", "dv", "dg", "dbeta", "ds0"], got, expected):
            torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5, msg=lambda m: f"{backend} {name}: {m}")


# normalised in the kernels; wider than a tile: normalised first (slow: 12 s on 2 cores in the interpreter)
@pytest.mark.parametrize("K", [20, pytest.param(80, marks=pytest.mark.slow)])
def test_fused_packed_qkv_matches_the_unpacked_kernels_and_writes_head_last(K):
    """delta_rule_fused_packed on one head-last (B, T, 3, H, d) tensor: the outputs and gradients of the unpacked
    call on its q, k, v, with o a view of a head-last tensor and the gradient of qkv one contiguous tensor."""
    from hydralm.kernels.delta_rule.triton_fused import delta_rule_fused_packed

    B, H, T, C = 2, 3, 90, 64
    qkv = torch.randn(B, T, 3, H, K)
    g, beta, s0 = -torch.rand(B, H, T) * 0.1, torch.rand(B, H, T), torch.randn(B, H, K, K)

    def packed(q, k, v, g, beta, initial_state):
        joint = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2)
        o, s = delta_rule_fused_packed(joint, g, beta, initial_state, chunk_size=C, qk_l2norm_eps=1e-6)
        if K <= 64:
            assert o.transpose(1, 2).is_contiguous()
        return o, s

    def unpacked(*a, **kw):
        return delta_rule_chunkwise(*a, **kw, chunk_size=C, backend="fused", qk_l2norm_eps=1e-6)

    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    inputs = [q, k, v, g, beta, s0]
    for name, a, e in zip(
        ["o", "state", "dq", "dk", "dv", "dg", "dbeta", "ds0"],
        _outputs_and_grads(packed, inputs, with_state=True),
        _outputs_and_grads(unpacked, inputs, with_state=True),
    ):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    joint = qkv.clone().requires_grad_()
    o, _ = delta_rule_fused_packed(joint, g, beta, chunk_size=C, qk_l2norm_eps=1e-6)
    (grad,) = torch.autograd.grad(o.sum(), joint)
    assert grad.is_contiguous() and grad.shape == qkv.shape


def test_fp32_dots_follow_torch_precision_for_fp32_inputs_and_run_tf32_for_16_bit_inputs(monkeypatch):
    """IEEE fp32 dots run on CUDA cores: a bf16 model's kernels take TF32 for their fp32 tiles whatever torch's
    setting, while fp32 inputs keep "highest" = IEEE (the fp32 claims are checked that way)."""
    from hydralm.kernels.delta_rule import triton_fused

    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_fused.kernel_constants(64, 64, 64, dtype=torch.float32)["PRECISION"] == "ieee"
        for dtype in (torch.bfloat16, torch.float16):
            assert triton_fused.kernel_constants(64, 64, 64, dtype=dtype)["PRECISION"] == "tf32"
        torch.set_float32_matmul_precision("high")
        assert triton_fused.kernel_constants(64, 64, 64, dtype=torch.float32)["PRECISION"] == "tf32"
        # the forward passes its inputs' dtype: the state pass gets the same precision as the prep kernel
        seen = []
        real = triton_fused.state_pass_forward
        monkeypatch.setattr(triton_fused, "state_pass_forward", lambda *a: seen.append(a[-1]) or real(*a))
        torch.set_float32_matmul_precision("highest")
        q, k, v = (F.normalize(torch.randn(1, 2, 40, 16), dim=-1).bfloat16() for _ in range(3))
        g, beta = -torch.rand(1, 2, 40), torch.rand(1, 2, 40)
        triton_fused.delta_rule_fused(q, k, v, g, beta)
        triton_fused.delta_rule_fused(q.float(), k.float(), v.float(), g, beta)
        assert seen == ["tf32", "ieee"]
    finally:
        torch.set_float32_matmul_precision(previous)
