"""Chunk-sparse top-k retrieval attention: the gather path (CPU / eager, and any call with a state).

The sequence is cut into chunks of C tokens; chunk j's summary is the mean of its keys. A token t in
chunk i attends, with one exact softmax, to
  * its local context: chunk i-1 in full and chunk i up to itself, and
  * the top_k chunks among 0 .. i-2 that score highest against its own query (q_t . summary_j).
Routing reads only q_t and chunks completed before t's local context, so it is causal: the parallel
forward, chunked prefill and token-by-token decoding pick the same chunks and give the same outputs.

The parallel path is block-sparse: the C queries of a chunk share one gather of the union of their
selections (u chunks, u <= min(k * C, i - 1)) and a per-query mask keeps each query on its own k chunks.
Attention reads O(N * u * C) keys: O(N * k * C) when the tokens of a chunk route alike, never more than
min(k * C, N / C) chunks per query; routing scores cost O(N * (N / C) * D). No N x N matrix is built.
Decoding reads exactly the token's k chunks.

Routing is in routing.py; reference.py is the dense oracle the tests compare with.
"""

import torch
import torch.nn.functional as F


def gather_chunks(chunks: torch.Tensor, selected: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """chunks (B, H_kv, n, C, D) holding global ids offset .. offset + n - 1; selected (B, H, ..., k) global
    ids -> (B, H, ..., k, C, D). Ids outside the range are clamped: the caller masks or replaces them.
    Query head h reads key head h // (H / H_kv)."""
    B, h_kv, n = chunks.shape[:3]
    H = selected.shape[1]
    extra = selected.dim() - 2
    b_idx = torch.arange(B, device=chunks.device).view(B, *([1] * (extra + 1)))
    h_idx = (torch.arange(H, device=chunks.device) // (H // h_kv)).view(1, H, *([1] * extra))
    flat = (b_idx * h_kv + h_idx) * n + (selected - offset).clamp(0, max(n - 1, 0))
    # index_select on a flat view: its backward is index_add, much faster on CPU than the index_put
    # that advanced indexing produces.
    rows = chunks.reshape(B * h_kv * n, *chunks.shape[3:]).index_select(0, flat.reshape(-1))
    return rows.reshape(*selected.shape, *chunks.shape[3:])


def union_of_selections(selected: torch.Tensor, valid: torch.Tensor, n_chunks: int):
    """Per query block, the distinct chunks its queries selected.

    selected/valid (..., Q, k) -> union ids (..., u), union validity (..., u) and which union entries each
    query may read (..., Q, u); u is the largest union in the batch (shorter ones are padded, invalid).
    """
    sentinel = torch.full_like(selected, n_chunks)
    ids = torch.where(valid, selected, sentinel).flatten(-2)  # (..., Q * k)
    member = torch.zeros(*ids.shape[:-1], n_chunks + 1, dtype=torch.bool, device=ids.device)
    member.scatter_(-1, ids, True)
    member = member[..., :n_chunks]
    u = max(1, int(member.sum(-1).max())) if member.numel() else 1
    order = torch.argsort(member.to(torch.int8), dim=-1, descending=True, stable=True)[..., :u]
    union_valid = member.gather(-1, order)
    union = order if order.shape[-1] == u else F.pad(order, (0, u - order.shape[-1]))
    union_valid = union_valid if union_valid.shape[-1] == u else F.pad(union_valid, (0, u - union_valid.shape[-1]))
    reads = ((selected[..., :, None] == union[..., None, None, :]) & valid[..., :, None]).any(-2)
    return union, union_valid, reads & union_valid[..., None, :]


def sparse_chunk_attention(
    q: torch.Tensor,
    chunk_k: torch.Tensor,
    chunk_v: torch.Tensor,
    chunk_mask: torch.Tensor,
    local_k: torch.Tensor,
    local_v: torch.Tensor,
    local_mask: torch.Tensor,
) -> torch.Tensor:
    """One softmax per query over [retrieved chunks | local context].

    q (..., Q, D); chunk_k/v (..., u, C, D) chunks shared by the block's Q queries, chunk_mask
    (..., Q, u) which of them each query reads; local_k/v (..., L, D) with local_mask broadcastable to
    (..., Q, L). Returns (..., Q, D) in q's dtype (SDPA computes the softmax in fp32 at least).
    """
    C, D = chunk_k.shape[-2], q.shape[-1]
    lead, Q = q.shape[:-2], q.shape[-2]
    keys = torch.cat([chunk_k.flatten(-3, -2), local_k.expand(*lead, -1, -1)], dim=-2)
    values = torch.cat([chunk_v.flatten(-3, -2), local_v.expand(*lead, -1, -1)], dim=-2)
    mask = torch.cat([chunk_mask.repeat_interleave(C, dim=-1), local_mask.expand(*lead, Q, local_k.shape[-2])], dim=-1)
    # Leading dims flattened into heads: SDPA's fused kernels take 4-D inputs only.
    out = F.scaled_dot_product_attention(
        q.reshape(1, -1, Q, D),
        keys.to(q.dtype).reshape(1, -1, keys.shape[-2], D),
        values.to(q.dtype).reshape(1, -1, keys.shape[-2], values.shape[-1]),
        attn_mask=mask.reshape(1, -1, Q, mask.shape[-1]),
    )
    return out.reshape(*lead, Q, -1)
