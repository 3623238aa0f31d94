"""The decode GEMV (HYDRALM_DECODE_LINEAR=gemv, kernels/linear/triton_gemv.py) against F.linear, on fresh random
inputs. Off GPU the kernel runs in Triton's CPU interpreter (conftest.py). Tolerances, relative to the largest
output: fp32 1e-5 (the same products, another summation order); bf16 1e-2 (F.linear and the kernel both
accumulate in fp32 and round the output once: they differ by about one bf16 rounding)."""

import pytest
import torch
import torch.nn.functional as F

from hydralm import HydraConfig, HydraLM
from hydralm.kernels.triton_common import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("shape, N", [((1, 300), 17), ((3, 64), 768), ((2, 8, 5), 40), ((16, 130), 9)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gemv_equals_f_linear(shape, N, dtype, tol):
    from hydralm.kernels.linear.triton_gemv import gemv

    gen = torch.Generator().manual_seed(sum(shape) + N)
    x = torch.randn(*shape, generator=gen).to(dtype)
    weight = torch.randn(N, shape[-1], generator=gen).to(dtype)
    y = gemv(x, weight)
    assert y.shape == (*shape[:-1], N) and y.dtype == dtype
    assert _rel(y, F.linear(x.double(), weight.double())) < tol


def test_the_comparison_fails_when_one_weight_row_is_off():
    """Sabotage: a 1 % change in one of 768 weight rows is far outside the fp32 tolerance."""
    from hydralm.kernels.linear.triton_gemv import gemv

    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 64, generator=gen), torch.randn(768, 64, generator=gen)
    wrong = weight.clone()
    wrong[500] *= 1.01
    assert _rel(gemv(x, wrong), F.linear(x, weight)) > 10 * 1e-5


def test_gemv_refuses_too_many_rows():
    from hydralm.kernels.linear.triton_gemv import MAX_ROWS, gemv

    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        gemv(torch.randn(MAX_ROWS + 1, 8), torch.randn(4, 8))


def _model(seed=5):
    torch.manual_seed(seed)
    cfg = HydraConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=2, layer_types=["deltanet", "swa", "retrieval"],
                      swa_window=8, dn_chunk_size=8, retrieval_chunk_size=2, retrieval_top_k=1, mtp_depth=1,
                      initializer_range=0.2)  # fmt: skip
    return HydraLM(cfg).eval()


def _parallel_and_counted_steps(model, ids, backend: str, monkeypatch):
    """(parallel logits, logits of stepping the tokens one by one with HYDRALM_DECODE_LINEAR=backend, the folded
    arguments of each GEMV call the steps made)."""
    import hydralm.kernels.linear.triton_gemv as kernel

    with torch.no_grad():
        parallel = model(ids)["logits"]
    calls, gemv = [], kernel.gemv
    monkeypatch.setattr(kernel, "gemv", lambda *a, **k: calls.append(sorted(k)) or gemv(*a, **k))
    monkeypatch.setattr(kernel, "MIN_PROGRAMS", 2)  # wider column blocks: fewer programs for the CPU interpreter
    monkeypatch.setenv("HYDRALM_DECODE_LINEAR", backend)
    with torch.no_grad():
        state, steps = model.init_state(ids.shape[0]), []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    return parallel, torch.stack(steps, 1), calls


def test_decoding_with_the_gemv_gives_the_parallel_logits_and_training_never_takes_it(monkeypatch):
    """C1 with every block projection on the GEMV (counted), and a training forward + backward (autograd on, many
    rows) through F.linear with the switch set: the same loss and gradients as without it."""
    model = _model()
    ids = torch.randint(0, 50, (2, 6))  # the retrieval layer picks from token 4 on (chunks of 2)
    parallel, stepped, calls = _parallel_and_counted_steps(model, ids, "gemv", monkeypatch)
    assert (stepped - parallel).abs().max() < 1e-4
    assert len(calls) == 3 * 4 * ids.shape[1]  # 3 blocks x (mixer in, mixer out, MLP up, MLP down) per token

    model.train()
    grads = {}
    for backend in ("gemv", "torch"):
        monkeypatch.setenv("HYDRALM_DECODE_LINEAR", backend)
        model.zero_grad()
        out = model(ids, labels=ids)
        out["loss"].backward()
        grads[backend] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(grads["gemv"], grads["torch"]))


def test_the_gemv_compiles_in_one_graph(monkeypatch):
    """A custom op: the StaticDecoder's torch.compile(fullgraph=True) keeps it as one call (aot_eager here; the
    CUDA graph on a GPU is `gpu_check static_decode`)."""
    from hydralm.modules.swiglu import SwiGLU

    torch.manual_seed(6)
    mlp = SwiGLU(24, 40)
    x = torch.randn(2, 24)
    monkeypatch.setenv("HYDRALM_DECODE_LINEAR", "gemv")
    with torch.no_grad():
        eager = mlp(x)
        compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)
    assert _rel(eager, F.linear(F.silu(x @ mlp.gate_up.weight[:40].T) * (x @ mlp.gate_up.weight[40:].T),
                                mlp.down.weight)) < 1e-5  # fmt: skip


@pytest.mark.parametrize("N, K", [(3096, 768), (768, 768), (768, 2048), (4096, 768)])
def test_every_autotune_candidate_kept_for_a_shape_equals_f_linear_and_the_heuristic_is_among_them(N, K):
    """The GPU autotuner picks among the candidates `_keep_configs` keeps for a shape: each of them gives F.linear
    (here in the interpreter, on a slice of the columns), and the fixed heuristic's blocks are one of them, so
    tuning can only choose something the timing found at least as fast."""
    from hydralm.kernels.linear import triton_gemv as kernel

    M = 3
    kept = kernel._keep_configs(kernel._gemv_tuned.configs, {"M": M, "N": N, "K": K})
    blocks = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept}
    assert kernel._blocks(N, K) in blocks and all(n * k <= kernel.MAX_TILE for n, k in blocks)
    gen = torch.Generator().manual_seed(M + N + K)
    cols = 40  # a slice of the weight's rows keeps the interpreter quick; the blocks are the shape's
    x, weight = torch.randn(M, K, generator=gen), torch.randn(cols, K, generator=gen)
    for n, k in sorted(blocks):
        y = torch.empty(M, cols)
        kernel._gemv_kernel[(-(-cols // n),)](
            x, weight, y, M, cols, K, x.stride(0), weight.stride(0), y.stride(0), BLOCK_N=n, BLOCK_K=k
        )
        assert _rel(y, F.linear(x.double(), weight.double())) < 1e-5, (n, k)


def _launch(x, weight, block_k):
    from hydralm.kernels.linear import triton_gemv as kernel

    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    block_n = kernel._blocks(*weight.shape)[0]
    kernel._gemv_kernel[(-(-weight.shape[0] // block_n),)](
        x, weight, y, x.shape[0], weight.shape[0], x.shape[1], x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_of_a_several_row_call_is_bit_identical_to_a_one_row_call(dtype):
    """Speculative verification scores drafts with several-row calls and decoding with one-row calls: each row
    must be exact, whatever the other rows are. Sabotage: a several-row call with another K step (the blocks
    it took before rows were exact) differs in the last bits, so the comparison can fail."""
    from hydralm.kernels.linear import triton_gemv as kernel

    gen = torch.Generator().manual_seed(11)
    K, N = 256, 8
    x, weight = torch.randn(3, K, generator=gen).to(dtype), torch.randn(N, K, generator=gen).to(dtype)
    several = kernel.gemv(x, weight)
    for i in range(x.shape[0]):
        assert torch.equal(several[i], kernel.gemv(x[i : i + 1], weight)[0]), i
    if dtype == torch.float32:  # bf16 outputs round most last-bit differences away
        other_k = _launch(x, weight, 32)  # another K step: another summation order
        assert not torch.equal(other_k, several)


def test_every_call_takes_the_autotuned_kernel_on_a_gpu(monkeypatch):
    """Off the interpreter (a GPU) one-row and several-row calls launch the autotuned kernel (blocks per (N, K),
    the same for every row count); a stand-in launcher records the calls."""
    from hydralm.kernels.linear import triton_gemv as kernel

    launched = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((args[3], {"BLOCK_N", "BLOCK_K"} & set(meta)))

    monkeypatch.setattr(kernel, "interpreting", lambda: False)
    monkeypatch.setattr(kernel, "_gemv_tuned", Launcher())
    kernel.gemv(torch.randn(1, 64), torch.randn(32, 64))
    kernel.gemv(torch.randn(3, 64), torch.randn(32, 64))
    assert launched == [(1, set()), (3, set())]  # blocks from the autotuner, none fixed by the call


# -- the block's elementwise ops folded into the GEMV (HYDRALM_DECODE_LINEAR=fused) -------------------------------
# Against the modules' ops in the same dtype: fp32 within 1e-5 (another order of one fp32 sum: the norm's and the
# dot's); bf16 within 1e-2 (one input may round to the neighbouring bf16 value, as in the plain GEMV's bound).


def _folded_cases(dtype):
    from hydralm.modules.rmsnorm import RMSNorm

    gen = torch.Generator().manual_seed(21)
    K, N, rows = 96, 40, 3
    norm = RMSNorm(K, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(K, generator=gen))
    x = (2 * torch.randn(rows, K, generator=gen)).to(dtype)
    h = torch.randn(rows, 2 * K, generator=gen).to(dtype)  # [gate | up]
    residual = torch.randn(rows, N, generator=gen).to(dtype)
    weight = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    gate, up = h.chunk(2, dim=-1)
    return {  # name: (kernel arguments, what the modules compute)
        "norm": ((x, weight), dict(norm_weight=norm.weight, eps=norm.eps), F.linear(norm.reference(x), weight)),
        "residual": ((x, weight), dict(residual=residual), residual + F.linear(x, weight)),
        "swiglu": ((h, weight), dict(swiglu=True), F.linear(F.silu(gate) * up, weight)),
        "swiglu+residual": (
            (h, weight),
            dict(swiglu=True, residual=residual),
            residual + F.linear(F.silu(gate) * up, weight),
        ),  # fmt: skip
    }


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_folded_norm_swiglu_and_residual_equal_the_module_ops(dtype, tol):
    from hydralm.kernels.linear.triton_gemv import gemv

    with torch.no_grad():
        for name, (args, folded, expected) in _folded_cases(dtype).items():
            y = gemv(*args, **folded)
            assert y.dtype == dtype and y.shape == expected.shape, name
            assert _rel(y, expected) < tol, name
            for i in range(y.shape[0]):  # rows stay exact with the folds
                one_row = {k: (v[i : i + 1] if k == "residual" else v) for k, v in folded.items()}
                assert torch.equal(y[i], gemv(args[0][i : i + 1], args[1], **one_row)[0]), (name, i)


def test_the_folded_comparison_fails_when_one_norm_channel_is_off():
    """Sabotage: the norm's weight 5 % off in one of 96 channels is far outside the fp32 tolerance."""
    from hydralm.kernels.linear.triton_gemv import gemv

    (x, weight), folded, expected = _folded_cases(torch.float32)["norm"]
    wrong = folded["norm_weight"].detach().clone()
    wrong[7] *= 1.05
    with torch.no_grad():
        assert _rel(gemv(x, weight, norm_weight=wrong, eps=folded["eps"]), expected) > 10 * 1e-5


def test_folded_inputs_that_do_not_fit_get_one_clear_error():
    from hydralm.kernels.linear.triton_gemv import gemv

    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="needs 16"):
        gemv(x, weight, swiglu=True)  # [gate | up] is twice K wide
    with pytest.raises(ValueError, match="residual must hold 2 x 4"):
        gemv(x, weight, residual=torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"norm_weight must be \(8,\)"):
        gemv(x, weight, norm_weight=torch.ones(4))


def test_decoding_with_the_folds_gives_the_parallel_logits(monkeypatch):
    """C1 with HYDRALM_DECODE_LINEAR=fused: every block projection of a step, and the LM head, is one GEMV with its
    norm, product or residual folded in (counted), the logits within 1e-4 of the parallel forward; step_many
    (speculative verification) equals the steps; and a block's step compiles to one graph with the folded calls."""
    model = _model()
    ids = torch.randint(0, 50, (2, 6))
    parallel, stepped, calls = _parallel_and_counted_steps(model, ids, "fused", monkeypatch)
    assert (stepped - parallel).abs().max() < 1e-4
    per_block = [["eps", "norm_weight"], ["residual", "swiglu"], ["eps", "norm_weight"], ["residual", "swiglu"]]
    head = [["eps", "norm_weight"]]  # the final norm folded into the LM head
    assert sorted(map(str, calls)) == sorted(map(str, (per_block * 3 + head) * ids.shape[1]))
    with torch.no_grad():
        many, _, _ = model.step_many(ids[:, :3], model.init_state(2))
        assert (many - stepped[:, :3]).abs().max() < 1e-5
        block, x_t = model.blocks[0], torch.randn(2, 32)
        eager = block.step(x_t, model.init_state(2)[0])[0]
        compiled = torch.compile(block.step, fullgraph=True, backend="aot_eager")(x_t, model.init_state(2)[0])[0]
        assert torch.equal(compiled, eager)
