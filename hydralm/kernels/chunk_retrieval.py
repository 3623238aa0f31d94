"""Chunk-sparse top-k retrieval attention: token-level causal routing and the gather path (CPU / eager).

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

``retrieval_attention_reference`` builds the same routing with plain loops and an explicit dense mask;
it exists only to test the fast paths on small inputs.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F


def route_tokens(
    q: torch.Tensor, summary_parts: List[torch.Tensor], n_eligible: torch.Tensor, top_k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k past chunks for every query.

    q: (B, H, ..., D) queries; summary_parts: chunk summaries (B, H_kv, n_p, D) in global chunk order
    (kept as parts so the caller's bank is never copied); n_eligible: broadcastable to q's middle dims
    (...,): a query may pick chunks j < n_eligible.
    Returns chunk ids (B, H, ..., top_k) and a validity mask of the same shape.
    """
    B, H = q.shape[:2]
    middle, D = q.shape[2:-1], q.shape[-1]
    h_kv = summary_parts[0].shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    rows = q.to(dtype).reshape(B, h_kv, H // h_kv, -1, D)
    # (B, H_kv, G, R, D) @ (B, H_kv, 1, D, n): query heads of a group share their key head's summaries.
    scores = torch.cat([rows @ s.to(dtype).transpose(-1, -2)[:, :, None] for s in summary_parts], dim=-1)
    scores = scores.reshape(B, H, *middle, -1)
    n_total = scores.shape[-1]
    selected = torch.zeros(B, H, *middle, top_k, dtype=torch.long, device=q.device)
    valid = torch.zeros(B, H, *middle, top_k, dtype=torch.bool, device=q.device)
    k = min(top_k, n_total)
    if k == 0:
        return selected, valid
    eligible = torch.arange(n_total, device=q.device) < n_eligible[..., None]
    top, idx = scores.masked_fill(~eligible, float("-inf")).topk(k, dim=-1)
    selected[..., :k] = idx
    valid[..., :k] = torch.isfinite(top)
    return selected, valid


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
    mask = torch.cat([chunk_mask.repeat_interleave(C, dim=-1),
                      local_mask.expand(*lead, Q, local_k.shape[-2])], dim=-1)
    # Leading dims flattened into heads: SDPA's fused kernels take 4-D inputs only.
    out = F.scaled_dot_product_attention(
        q.reshape(1, -1, Q, D), keys.to(q.dtype).reshape(1, -1, keys.shape[-2], D),
        values.to(q.dtype).reshape(1, -1, keys.shape[-2], values.shape[-1]), attn_mask=mask.reshape(1, -1, Q, mask.shape[-1]),
    )
    return out.reshape(*lead, Q, -1)


def retrieval_mask_reference(q: torch.Tensor, k: torch.Tensor, chunk_size: int, top_k: int) -> torch.Tensor:
    """Readable reference of who reads whom: q, k (B, H, N, D), same heads -> allowed (B, H, N, N) bool.
    Plain loops; small N only."""
    B, H, N, D = q.shape
    C = chunk_size
    allowed = torch.zeros(B, H, N, N, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            summaries = [k[b, h, j * C : (j + 1) * C].float().mean(0) for j in range(N // C)]
            for t in range(N):
                i = t // C
                scores = {j: float(q[b, h, t].float() @ summaries[j]) for j in range(max(0, i - 1))}
                for j in sorted(scores, key=lambda j: -scores[j])[:top_k]:
                    allowed[b, h, t, j * C : (j + 1) * C] = True
                allowed[b, h, t, max(0, (i - 1) * C) : t + 1] = True  # chunk i-1 and chunk i up to t
    return allowed


def retrieval_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, top_k: int
) -> torch.Tensor:
    """Readable reference from scratch: q, k, v (B, H, N, D), same heads. Dense N x N mask; small N only."""
    D = q.shape[-1]
    allowed = retrieval_mask_reference(q, k, chunk_size, top_k)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
