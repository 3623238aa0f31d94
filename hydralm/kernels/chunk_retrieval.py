"""Chunk-sparse top-k retrieval attention: token-level causal routing and the gather path (CPU / eager).

The sequence is cut into chunks of C tokens; chunk j's summary is the mean of its keys. A token t in
chunk i attends, with one exact softmax, to
  * its local context: chunk i-1 in full and chunk i up to itself, and
  * the top_k chunks among 0 .. i-2 that score highest against its own query (q_t . summary_j).
Routing reads only q_t and chunks completed before t's local context, so it is causal: the parallel
forward, chunked prefill and token-by-token decoding pick the same chunks and give the same outputs.
Work is O(N * (k + 2) * C * D) for attention plus O(N * (N / C) * D) for routing scores; no N x N
matrix is ever built.

``retrieval_attention_reference`` builds the same routing with plain loops and an explicit dense mask;
it exists only to test the fast paths on small inputs.
"""

from typing import List, Tuple

import torch


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
    return chunks[b_idx, h_idx, (selected - offset).clamp(0, max(n - 1, 0))]


def topk_chunk_attention(
    q: torch.Tensor,
    selected_k: torch.Tensor,
    selected_v: torch.Tensor,
    selected_valid: torch.Tensor,
    local_k: torch.Tensor,
    local_v: torch.Tensor,
    local_mask: torch.Tensor,
) -> torch.Tensor:
    """One softmax per query over [its own selected chunks | a shared local context].

    q (..., Q, D); selected_k/v (..., Q, k, C, D) per-query chunks with selected_valid (..., Q, k);
    local_k/v (..., L, D) shared by the Q queries with local_mask broadcastable to (..., Q, L).
    Scores and softmax in fp32 (fp64 for fp64 inputs); returns (..., Q, D) in q's dtype.
    """
    k_sel, C = selected_k.shape[-3], selected_k.shape[-2]
    scale = q.shape[-1] ** -0.5
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(dtype)
    s_sel = torch.einsum("...qd,...qkcd->...qkc", qf, selected_k.to(dtype)).flatten(-2)
    s_loc = qf @ local_k.to(dtype).transpose(-1, -2)
    mask = torch.cat([selected_valid.repeat_interleave(C, dim=-1), local_mask.expand_as(s_loc)], dim=-1)
    probs = torch.softmax((torch.cat([s_sel, s_loc], dim=-1) * scale).masked_fill(~mask, float("-inf")), dim=-1)
    p_sel, p_loc = probs.split([k_sel * C, s_loc.shape[-1]], dim=-1)
    out = torch.einsum("...qkc,...qkcd->...qd", p_sel.unflatten(-1, (k_sel, C)), selected_v.to(dtype))
    return (out + p_loc @ local_v.to(dtype)).to(q.dtype)


def retrieval_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, top_k: int
) -> torch.Tensor:
    """Readable reference from scratch: q, k, v (B, H, N, D), same heads. Dense N x N mask; small N only."""
    B, H, N, D = q.shape
    C = chunk_size
    out = torch.empty_like(v)
    for b in range(B):
        for h in range(H):
            allowed = torch.zeros(N, N, dtype=torch.bool)
            summaries = [k[b, h, j * C : (j + 1) * C].float().mean(0) for j in range(N // C)]
            for t in range(N):
                i = t // C
                scores = {j: float(q[b, h, t].float() @ summaries[j]) for j in range(max(0, i - 1))}
                for j in sorted(scores, key=lambda j: -scores[j])[:top_k]:
                    allowed[t, j * C : (j + 1) * C] = True
                allowed[t, max(0, (i - 1) * C) : t + 1] = True  # chunk i-1 and chunk i up to t
            scores = (q[b, h] @ k[b, h].transpose(0, 1)) * D**-0.5
            out[b, h] = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v[b, h]
    return out
