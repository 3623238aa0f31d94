"""The retrieval decode step as one Triton kernel (HYDRALM_RETRIEVAL_DECODE=triton, kernels/retrieval/
triton_decode.py) against the PyTorch step, on fresh random weights and streams. Off GPU the kernel runs in
Triton's CPU interpreter (conftest.py). Tolerances: fp32 1e-5 relative to the largest logit (the same picks and
formulas, another summation order); bf16 2e-2."""

import pytest
import torch
from helpers import MIXED_GQA

from hydralm import HydraConfig, HydraLM
from hydralm.kernels.triton_common import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")

MEMORY = {"exact_window": 32, "compress_every": 4, "pool_size": 16}  # 4 exact chunks of 8, 8 pooled chunks of 2


def _model(dtype=torch.float32, **fields) -> HydraLM:
    torch.manual_seed(0)
    return HydraLM(HydraConfig(**{**MIXED_GQA, "swa_window": 8, **fields})).to(dtype).eval()


def _decode(model, ids, prefix: int, backend: str, monkeypatch) -> torch.Tensor:
    """Logits of stepping ids[:, prefix:] one token at a time after a parallel read of ids[:, :prefix]."""
    monkeypatch.setenv("HYDRALM_RETRIEVAL_DECODE", backend)
    with torch.no_grad():
        state = model(ids[:, :prefix], return_state=True)["state"] if prefix else model.init_state(ids.shape[0])
        logits = []
        for t in range(prefix, ids.shape[1]):
            out, state = model.step(ids[:, t], state)
            logits.append(out)
    return torch.stack(logits, 1).float()


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "fields, rows, prefix, steps",
    [
        (dict(memory=MEMORY), 1, 0, 9),  # the first chunks: fewer to pick than top_k, the previous chunk appears
        (dict(memory=MEMORY), 2, 101, 4),  # exact and pooled chunks held, a chunk completing during the steps
        (dict(memory=MEMORY, retrieval_top_k=3), 1, 300, 4),  # evicted chunks
        (dict(memory=MEMORY, n_kv_heads=4, retrieval_top_k=1), 1, 57, 4),  # MHA, one pick, a chunk half filled
        (dict(), 1, 45, 4),  # no memory: the bank grows
        (dict(memory=MEMORY, d_model=64, n_heads=2, n_kv_heads=1), 1, 100, 4),  # D 32: scores over two column blocks
    ],
)
def test_the_kernel_step_equals_the_pytorch_step(fields, rows, prefix, steps, monkeypatch):
    model = _model(**fields)
    ids = torch.randint(0, 64, (rows, prefix + steps))
    reference = _decode(model, ids, prefix, "torch", monkeypatch)
    assert _rel(_decode(model, ids, prefix, "triton", monkeypatch), reference) < 1e-5


def test_the_comparison_fails_when_a_pick_is_dropped(monkeypatch):
    """Sabotage: the kernel told to read one chunk fewer than the layer picks is caught by the fp32 bound."""
    import hydralm.kernels.retrieval.triton_decode as fused

    model = _model(memory=MEMORY)
    ids = torch.randint(0, 64, (1, 104))
    reference = _decode(model, ids, 100, "torch", monkeypatch)
    kernel = fused.retrieval_decode_step
    monkeypatch.setattr(fused, "retrieval_decode_step", lambda *args: kernel(*args[:-1], args[-1] - 1))
    assert _rel(_decode(model, ids, 100, "triton", monkeypatch), reference) > 1e-4


def test_the_kernel_step_in_bf16(monkeypatch):
    model = _model(torch.bfloat16, memory=MEMORY)
    ids = torch.randint(0, 64, (1, 103))
    assert _rel(_decode(model, ids, 100, "triton", monkeypatch), _decode(model, ids, 100, "torch", monkeypatch)) < 2e-2


@pytest.mark.slow  # two compilations, ~45 s on 2 cores
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_step_updates_the_rings_in_place(backend, monkeypatch):
    """StaticDecoder's compiled step writes a completing chunk into the bank and pool where they lie. Inductor moves
    an op next to its first user; the kernel's one output would then be read after the ring update, which needs a
    copy of each ring (10.8 ms a step at batch 64 on an H200), so the op returns a 1-tuple, which stays in place."""
    from torch._inductor.utils import run_and_get_code

    from hydralm.static_decode import StaticDecoder

    monkeypatch.setenv("HYDRALM_RETRIEVAL_DECODE", backend)
    torch.manual_seed(0)
    fields = dict(vocab_size=64, d_model=64, n_layers=1, n_heads=2, retrieval_chunk_size=8, retrieval_top_k=2)
    model = HydraLM(HydraConfig(**fields, layer_types=["retrieval"], memory=MEMORY)).eval()
    with torch.no_grad():
        state = model(torch.randint(0, 64, (2, 40)), return_state=True)["state"]
        decoder = StaticDecoder(model, state, compile=True)
        _, (code,) = run_and_get_code(decoder.step, torch.zeros(2, dtype=torch.long))
    layer = state[0]
    for ring in (layer.bank_k, layer.bank_v, layer.pool_k, layer.pool_v):
        assert f"empty_strided_cpu({tuple(ring.shape)}" not in code, f"a copy of a {tuple(ring.shape)} ring"
