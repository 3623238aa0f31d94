"""The sliding-window decode step's kernel (HYDRALM_SWA_DECODE=triton, kernels/attention/triton_decode.py) against a
plain PyTorch softmax over the ring's written slots, and a model stepped on it against the parallel forward and the
PyTorch step, on fresh random inputs. Off GPU the kernel runs in Triton's CPU interpreter (conftest.py).
Tolerances, max abs error relative to the reference's max |value|: the kernel vs the fp64 reference 1e-5 for fp32
inputs (another summation order) and 2e-2 for bf16 (the output's rounding, 2^-8, and bf16 inputs); a model's fp32
logits 1e-4 vs the parallel forward (other kernels throughout) and 1e-5 vs the PyTorch step (the same projections,
only the attention differs)."""

import pytest
import torch

from hydralm import HydraConfig, HydraLM
from hydralm.kernels.triton_common import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")


def _reference(q, ring_k, ring_v, pos: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the written ring slots (slot j once j <= pos), fp64, query head h reading key
    head h // (H / H_kv)."""
    groups, W = q.shape[1] // ring_k.shape[1], ring_k.shape[2]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (ring_k, ring_v))
    scores = torch.einsum("bhd,bhwd->bhw", q.double(), k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.arange(W) > pos, float("-inf"))
    return torch.einsum("bhw,bhwd->bhd", scores.softmax(-1), v)


def _inputs(B, H, H_kv, D, W, dtype):
    q = torch.randn(B, H, D).to(dtype)
    return q, torch.randn(B, H_kv, W, D).to(dtype), torch.randn(B, H_kv, W, D).to(dtype)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CASES = [  # B, H, H_kv, D, W, pos
    (1, 4, 4, 16, 8, 3),  # MHA, the ring not full yet
    (3, 2, 2, 16, 8, 8),  # MHA, just wrapped
    (3, 4, 2, 64, 64, 200),  # GQA, wrapped
    (1, 4, 4, 64, 64, 63),  # the ring just full
    (1, 6, 2, 24, 100, 37),  # GQA, D not a power of 2, W ragged (two blocks, the second one empty)
    (3, 4, 1, 24, 100, 70),  # one key head, the second block partly written
    (1, 4, 4, 64, 100, 1000),  # wrapped, W ragged
]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B, H, H_kv, D, W, pos", CASES)
def test_the_kernel_equals_a_softmax_over_the_written_slots(B, H, H_kv, D, W, pos, dtype, tol):
    from hydralm.kernels.attention.triton_decode import sliding_window_decode

    q, ring_k, ring_v = _inputs(B, H, H_kv, D, W, dtype)
    for position in (pos, torch.tensor(pos)):  # a Python int (eager steps) and a 0-d tensor (StaticDecoder)
        y = sliding_window_decode(q, ring_k, ring_v, position)
        assert y.shape == q.shape and y.dtype == dtype
        assert _rel(y, _reference(q, ring_k, ring_v, pos)) < tol


def test_the_comparison_fails_when_a_written_slot_is_dropped():
    """Sabotage: the kernel told the position before the token's (its own slot left out) is caught by the fp32
    bound."""
    from hydralm.kernels.attention.triton_decode import sliding_window_decode

    q, ring_k, ring_v = _inputs(3, 4, 2, 24, 100, torch.float32)
    assert _rel(sliding_window_decode(q, ring_k, ring_v, 69), _reference(q, ring_k, ring_v, 70)) > 1e-3


def _model() -> HydraLM:
    torch.manual_seed(0)  # GQA (4 query heads on 2 key heads), D 16, a ring of 8 that wraps in the tests' streams
    cfg = HydraConfig(
        vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, layer_types=["swa", "deltanet"], swa_window=8
    )
    return HydraLM(cfg).eval()


def _stepped(model, ids, backend_name: str, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("HYDRALM_SWA_DECODE", backend_name)
    state, logits = model.init_state(ids.shape[0]), []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out, state = model.step(ids[:, t], state)
            logits.append(out)
    return torch.stack(logits, 1)


def test_a_model_stepped_on_the_kernel_gives_the_parallel_logits(monkeypatch):
    import hydralm.kernels.attention.triton_decode as kernel

    calls, decode = [], kernel.sliding_window_decode
    monkeypatch.setattr(kernel, "sliding_window_decode", lambda *args: calls.append(1) or decode(*args))
    model = _model()
    ids = torch.randint(0, 64, (2, 20))  # 20 tokens: the ring of 8 fills, then wraps twice
    stepped = _stepped(model, ids, "triton", monkeypatch)
    assert len(calls) == 20  # the kernel ran at every step
    with torch.no_grad():
        parallel = model(ids)["logits"]
    assert _rel(stepped, parallel) < 1e-4
    assert _rel(stepped, _stepped(model, ids, "torch", monkeypatch)) < 1e-5


def test_the_step_compiles_with_the_kernel_in_its_graph(monkeypatch):
    """torch.compile(fullgraph=True) of the decode step on device counters and buffers updated in place (as a
    StaticDecoder steps): no graph break, one graph with the op in it, the PyTorch step's logits."""
    from torch._dynamo.backends.registry import lookup_backend

    monkeypatch.setenv("HYDRALM_SWA_DECODE", "triton")
    model = _model()
    graphs = []

    def aot_eager_recording(gm, example_inputs):
        graphs.append(gm.code)
        return lookup_backend("aot_eager")(gm, example_inputs)

    step = torch.compile(model.decode_step, fullgraph=True, backend=aot_eager_recording)
    ids = torch.randint(0, 64, (2, 12))
    expected = _stepped(model, ids, "torch", monkeypatch)
    monkeypatch.setenv("HYDRALM_SWA_DECODE", "triton")
    state = [layer.with_device_counters("cpu") for layer in model.init_state(2)]
    with torch.no_grad():
        for t in range(ids.shape[1]):
            logits, new_state, _ = step(ids[:, t], state)
            for buffers, new in zip(state, new_state):
                buffers.copy_(new)  # as a StaticDecoder does: the same inputs at every step, one graph
            assert _rel(logits, expected[:, t]) < 1e-5
    assert len(graphs) == 1 and "sliding_window_decode" in graphs[0]
