"""Fast kernels against their plain references, on fresh random inputs (fp64 unless stated)."""

import pytest
import torch
import torch.nn.functional as F

from hydralm.config import HydraConfig
from hydralm.kernels.attention.local import causal_attention, sliding_window_attention
from hydralm.kernels.delta_rule import delta_rule_chunkwise, delta_rule_recurrent, delta_rule_step
from hydralm.kernels.retrieval.reference import retrieval_attention_reference
from hydralm.model import HydraLM
from hydralm.modules.retrieval_attention import RetrievalAttention


def _delta_inputs(B, H, T, dk, dv, dtype=torch.float64, requires_grad=False):
    q = F.normalize(torch.randn(B, H, T, dk, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, dv, dtype=dtype)
    g = -torch.rand(B, H, T, dtype=dtype) * 0.7  # log-decay <= 0
    beta = torch.rand(B, H, T, dtype=dtype)
    s0 = torch.randn(B, H, dk, dv, dtype=dtype)
    tensors = [q, k, v, g, beta, s0]
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (37, 8), (64, 16), (50, 64)])
def test_chunkwise_delta_rule_matches_recurrent_outputs_and_state(T, chunk):
    q, k, v, g, beta, s0 = _delta_inputs(2, 3, T, 8, 6)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, g, beta, s0)
    o, s = delta_rule_chunkwise(q, k, v, g, beta, s0, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-10)


def test_chunkwise_delta_rule_gradients_match_recurrent():
    inputs = _delta_inputs(2, 2, 19, 5, 4, requires_grad=True)
    o_ref, s_ref = delta_rule_recurrent(*inputs)
    w_o, w_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), inputs)
    o, s = delta_rule_chunkwise(*inputs, chunk_size=8)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), inputs)
    for name, ga, gb in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, grads_ref):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-9, msg=f"gradient of {name}")


def test_delta_rule_state_is_fp32_for_low_precision_inputs():
    q, k, v, g, beta, _ = _delta_inputs(1, 2, 9, 4, 4, dtype=torch.float32)
    o, s = delta_rule_chunkwise(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, chunk_size=4)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    _, s_step = delta_rule_step(q[:, :, 0].bfloat16(), k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0], s)
    assert s_step.dtype == torch.float32


def test_padding_tokens_leave_the_state_untouched():
    # T = 5 with chunk 8 pads 3 tokens internally; the state must equal the recurrent one over 5 tokens.
    q, k, v, g, beta, s0 = _delta_inputs(1, 1, 5, 4, 4)
    _, s_ref = delta_rule_recurrent(q, k, v, g, beta, s0)
    _, s = delta_rule_chunkwise(q, k, v, g, beta, s0, chunk_size=8)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-12)


def _dense_window_reference(q, k, v, window, q_offset):
    N, M = q.shape[-2], k.shape[-2]
    i = q_offset + torch.arange(N)[:, None]
    j = torch.arange(M)[None, :]
    allowed = (j <= i) & (j > i - window) if window else (j <= i)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("N,offset,window", [(1, 0, 3), (23, 0, 5), (23, 4, 5), (40, 9, 16), (17, 30, 64)])
def test_sliding_window_attention_matches_dense_mask(N, offset, window):
    q = torch.randn(2, 3, N, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, offset + N, 8, dtype=torch.float64), torch.randn(2, 3, offset + N, 8, dtype=torch.float64)
    out = sliding_window_attention(q, k, v, window, q_offset=offset)
    torch.testing.assert_close(out, _dense_window_reference(q, k, v, window, offset), rtol=0, atol=1e-12)


def test_causal_attention_with_cache_matches_dense_mask():
    q = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 12, 8, dtype=torch.float64), torch.randn(1, 2, 12, 8, dtype=torch.float64)
    torch.testing.assert_close(
        causal_attention(q, k, v, 5), _dense_window_reference(q, k, v, None, 5), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("N,chunk,top_k", [(9, 4, 1), (50, 4, 2), (61, 8, 3), (64, 4, 20)])
def test_retrieval_attention_matches_dense_mask_reference(N, chunk, top_k):
    cfg = HydraConfig(
        vocab_size=8,
        d_model=16,
        n_layers=1,
        n_heads=2,
        layer_types=["retrieval"],
        retrieval_chunk_size=chunk,
        retrieval_top_k=top_k,
    )
    layer = RetrievalAttention(cfg).double()
    q, k, v = (torch.randn(2, 2, N, 8, dtype=torch.float64) for _ in range(3))
    out, _ = layer.attend(q, k, v)
    torch.testing.assert_close(out, retrieval_attention_reference(q, k, v, chunk, top_k), rtol=0, atol=1e-12)


def test_retrieval_attention_never_builds_a_sequence_by_sequence_matrix(monkeypatch):
    """A query block scores at most (min(k * C, N / C) + 2) * C keys, far fewer than N for long inputs."""
    import hydralm.modules.retrieval_attention as ra

    seen = []
    real = ra.sparse_chunk_attention

    def spy(q, chunk_k, chunk_v, chunk_mask, local_k, local_v, local_mask):
        seen.append(chunk_k.shape[-3] * chunk_k.shape[-2] + local_k.shape[-2])
        return real(q, chunk_k, chunk_v, chunk_mask, local_k, local_v, local_mask)

    monkeypatch.setattr(ra, "sparse_chunk_attention", spy)
    N, C, k = 1024, 8, 2
    cfg = HydraConfig(
        vocab_size=8,
        d_model=16,
        n_layers=1,
        n_heads=2,
        layer_types=["retrieval"],
        retrieval_chunk_size=C,
        retrieval_top_k=k,
    )
    RetrievalAttention(cfg).attend(*(torch.randn(1, 2, N, 8) for _ in range(3)))
    assert seen and max(seen) <= (k * C + 2) * C < N // 4


def test_stateful_retrieval_prefill_is_exact_whether_the_bank_is_copied_or_gathered_in_place(monkeypatch):
    """A long call copies the bank next to its new chunks once; a short call against a long bank gathers
    from both in place. Both must give the parallel forward's logits."""
    import hydralm.modules.retrieval_attention as ra

    sources_seen = set()
    real = ra._gather_exact

    def spy(union, sources):
        sources_seen.add(len(sources))
        return real(union, sources)

    monkeypatch.setattr(ra, "_gather_exact", spy)
    cfg = HydraConfig(
        vocab_size=64,
        d_model=32,
        n_layers=1,
        n_heads=2,
        layer_types=["retrieval"],
        retrieval_chunk_size=4,
        retrieval_top_k=2,
        initializer_range=0.2,
    )
    model = HydraLM(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 300))
    with torch.no_grad():
        parallel = model(ids)["logits"]
        state, pieces = None, []
        for a, b in [(0, 20), (20, 250), (250, 253), (253, 300)]:
            out = model(ids[:, a:b], state=state, return_state=True)
            state = out["state"]
            pieces.append(out["logits"])
    assert sources_seen == {1, 2}
    torch.testing.assert_close(torch.cat(pieces, 1), parallel, rtol=0, atol=1e-10)
