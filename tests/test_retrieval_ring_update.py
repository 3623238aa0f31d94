"""The retrieval layer's in-place ring update (kernels/retrieval/triton_ring_update.py, with
HYDRALM_RETRIEVAL_DECODE=triton on a StaticDecoder's buffers) against the PyTorch step's masked writes, on fresh
random rings and streams. Off GPU the kernel runs in Triton's CPU interpreter (conftest.py). Tolerances: the
bank, buffers and summaries' sums are exact or fp32 1e-6 relative (another summation order); the compressed pool
1e-6 in fp32, one bf16 rounding (2e-2) in bf16."""

import pytest
import torch

from hydralm import HydraConfig, HydraLM
from hydralm.kernels.triton_common import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")

MEMORY = {"exact_window": 32, "compress_every": 4, "pool_size": 12}  # 4 exact chunks of 8, 6 pooled chunks of 2


def _layer(dtype=torch.float32, n_kv_heads=1):
    fields = dict(vocab_size=64, d_model=64, n_layers=1, n_heads=2, n_kv_heads=n_kv_heads, retrieval_chunk_size=8)
    layer = HydraLM(HydraConfig(**fields, layer_types=["retrieval"], memory=MEMORY)).blocks[0].mixer.to(dtype)
    with torch.no_grad():
        layer.memory.pool_query.normal_()  # zero at init: plain mean pooling would hide a wrong weighting
    return layer


def _random_state(layer, rows, pos, dtype):
    state = layer.init_state(rows, dtype=dtype)
    for tensor in state.tensors().values():
        tensor.normal_()
    state.pos = torch.tensor(pos)
    return state


def _reference(layer, st):
    """What the PyTorch step writes after the token at st.pos (already in the buffer)."""
    C = layer.chunk_size
    c, filled = st.pos // C, st.pos % C
    rings = layer._complete_chunk(st, st.bank_k, st.bank_v, st.summaries, c, st.buf_k, st.buf_v, filled == C - 1)
    buf = [torch.where(filled == C - 1, torch.zeros_like(t), t) for t in (st.buf_k, st.buf_v)]
    return [*buf, *rings]


def _kernel(layer, st):
    from hydralm.kernels.retrieval.triton_ring_update import retrieval_complete_chunk_

    st = st.clone()
    tensors = [st.buf_k, st.buf_v, st.bank_k, st.bank_v, st.summaries, st.pool_k, st.pool_v, st.pool_summaries]
    retrieval_complete_chunk_(*tensors, layer.memory.pool_query, st.pos)
    return tensors


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "pos, rows, n_kv_heads",
    [
        (13, 2, 1),  # mid-chunk: nothing moves
        (23, 2, 1),  # chunk 2 completes, the bank still has room: no compression
        (39, 1, 2),  # chunk 4 completes into slot 0, chunk 0 leaves into pool slot 0 (MHA)
        (127, 2, 1),  # chunk 15: the pool has wrapped (pool slot 11 % 6)
    ],
)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_the_ring_update_equals_the_pytorch_step(pos, rows, n_kv_heads, dtype, tol):
    layer = _layer(dtype, n_kv_heads)
    st = _random_state(layer, rows, pos, dtype)
    with torch.no_grad():
        expected, got = _reference(layer, st), _kernel(layer, st)
    names = ["buf_k", "buf_v", "bank_k", "bank_v", "summaries", "pool_k", "pool_v", "pool_summaries"]
    for name, g, e in zip(names, got, expected):
        assert g.dtype == e.dtype and _rel(g, e) <= (tol if name.startswith("pool_") else 1e-6), name
    completes = pos % 8 == 7
    assert torch.equal(got[0], torch.zeros_like(got[0])) == completes  # the buffer is cleared with its chunk


def test_the_comparison_fails_when_the_pool_slot_is_off_by_one():
    """Sabotage: the kernel one chunk late (pos + 8, same place in the chunk) writes other slots: caught."""
    layer = _layer()
    st = _random_state(layer, 1, 39, torch.float32)
    with torch.no_grad():
        expected = _reference(layer, st)
        late = st.clone()
        late.pos = st.pos + 8
        got = _kernel(layer, late)
    assert max(_rel(g, e) for g, e in zip(got, expected)) > 1e-3


@pytest.mark.parametrize("rows", [1, 2])
def test_a_static_decoder_with_the_kernel_follows_model_step(rows, monkeypatch):
    """40 steps through chunk completions, compression into the pool and its wrap: logits and the final state of
    an eager StaticDecoder (ring-update kernel, in place) against model.step (the PyTorch step)."""
    from hydralm.static_decode import StaticDecoder

    torch.manual_seed(0)
    fields = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=2, retrieval_chunk_size=8, retrieval_top_k=2)
    model = HydraLM(HydraConfig(**fields, layer_types=["retrieval", "deltanet"], memory=MEMORY)).eval()
    with torch.no_grad():
        model.blocks[0].mixer.memory.pool_query.normal_()
        state = model(torch.randint(0, 64, (rows, 21)), return_state=True)["state"]
        decoder = StaticDecoder(model, state)
        token = torch.randint(0, 64, (rows,))
        for _ in range(40):
            monkeypatch.setenv("HYDRALM_RETRIEVAL_DECODE", "torch")
            expected, state = model.step(token, state)
            monkeypatch.setenv("HYDRALM_RETRIEVAL_DECODE", "triton")
            got = decoder.step(token)
            assert _rel(got, expected) < 1e-5
            token = expected.argmax(-1)
    for name, tensor in state[0].tensors().items():
        assert _rel(getattr(decoder.state[0], name), tensor) < 1e-5, name
    assert int(decoder.state[0].pos) == state[0].pos == 61
