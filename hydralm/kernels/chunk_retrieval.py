"""Chunk-sparse top-k retrieval attention: routing and the gather-based attention (CPU / eager path).

The sequence is cut into chunks of C tokens. Tokens of chunk i attend with one exact softmax to
  * the top-k chunks among 0 .. i-2, chosen by the mean query of chunk i-1 against each chunk's summary
    (the mean of its keys), and
  * chunk i-1 in full and chunk i causally (the local context).
Every input of chunk i's routing is complete before chunk i's first token, so routing is causal and the
parallel forward equals token-by-token decoding. Work is O(N * (k + 2) * C); no N x N matrix is built
(the routing scores are (N / C) x (N / C), one per chunk pair).

``retrieval_attention_reference`` builds the same routing with plain loops and an explicit dense mask;
it exists only to test the fast paths on small inputs.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F


def route_chunks(
    route_q: torch.Tensor, summary_parts: List[torch.Tensor], n_eligible: torch.Tensor, top_k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick the top_k past chunks for each routing row.

    route_q: (B, H, R, D) the mean query of the chunk before each routed chunk.
    summary_parts: chunk summaries (B, H_kv, n_p, D), concatenated in order along the chunk axis
        (kept as parts so the caller's bank is never copied).
    n_eligible: (R,) row r may pick only chunks j < n_eligible[r].
    Returns selected chunk ids (B, H, R, top_k) and a validity mask (B, H, R, top_k).
    """
    B, H, R, D = route_q.shape
    h_kv = summary_parts[0].shape[1]
    grouped = route_q.float().reshape(B, h_kv, H // h_kv, R, D)
    # (B, H_kv, G, R, D) @ (B, H_kv, 1, D, n) -> (B, H, R, n): no copy of the summaries per query head.
    scores = torch.cat([grouped @ s.float().transpose(-1, -2)[:, :, None] for s in summary_parts], dim=-1)
    scores = scores.reshape(B, H, R, -1)
    n_total = scores.shape[-1]
    selected = torch.zeros(B, H, R, top_k, dtype=torch.long, device=route_q.device)
    valid = torch.zeros(B, H, R, top_k, dtype=torch.bool, device=route_q.device)
    k = min(top_k, n_total)
    if k == 0:
        return selected, valid
    eligible = torch.arange(n_total, device=route_q.device)[None, :] < n_eligible[:, None]
    top, idx = scores.masked_fill(~eligible, float("-inf")).topk(k, dim=-1)
    selected[..., :k] = idx
    valid[..., :k] = torch.isfinite(top)
    return selected, valid


def gather_chunks(chunks: torch.Tensor, selected: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """chunks (B, H_kv, n, C, D); selected (B, H, ..., k) global ids -> (B, H, ..., k, C, D).

    Ids are global; this tensor holds chunks offset .. offset + n - 1 (ids outside are clamped and must be
    masked or replaced by the caller). Query head h reads key head h // (H / H_kv).
    """
    B, h_kv, n = chunks.shape[:3]
    H = selected.shape[1]
    extra = selected.dim() - 2
    b_idx = torch.arange(B, device=chunks.device).view(B, *([1] * (extra + 1)))
    h_idx = (torch.arange(H, device=chunks.device) // (H // h_kv)).view(1, H, *([1] * extra))
    return chunks[b_idx, h_idx, (selected - offset).clamp(0, n - 1)]


def chunk_attention(
    q: torch.Tensor,
    selected_k: torch.Tensor,
    selected_v: torch.Tensor,
    selected_valid: torch.Tensor,
    prev_k: torch.Tensor,
    prev_v: torch.Tensor,
    prev_valid: torch.Tensor,
    own_k: torch.Tensor,
    own_v: torch.Tensor,
    own_mask: torch.Tensor,
) -> torch.Tensor:
    """One softmax per query over [selected chunks | previous chunk | own chunk].

    q (B, H, M, Q, D): Q queries of each of M chunks; selected_k/v (B, H, M, k, C, D), selected_valid
    (B, H, M, k); prev_k/v (B, H, M, C, D), prev_valid broadcastable to (B, H, M); own_k/v (B, H, M, C, D),
    own_mask (Q, C) which own-chunk keys each query sees.
    """
    B, H, M, Q, D = q.shape
    k_sel, C = selected_k.shape[3], selected_k.shape[4]
    keys = torch.cat([selected_k.flatten(3, 4), prev_k, own_k], dim=3)
    values = torch.cat([selected_v.flatten(3, 4), prev_v, own_v], dim=3)
    mask = torch.cat(
        [
            selected_valid.repeat_interleave(C, dim=-1)[..., None, :].expand(B, H, M, Q, k_sel * C),
            prev_valid.expand(B, H, M)[..., None, None].expand(B, H, M, Q, C),
            own_mask.expand(B, H, M, Q, C),
        ],
        dim=-1,
    )
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)


def retrieval_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, top_k: int
) -> torch.Tensor:
    """Readable reference from scratch: q, k, v (B, H, N, D), same heads. Dense N x N mask; small N only."""
    B, H, N, D = q.shape
    C = chunk_size
    n_chunks = -(-N // C)
    out = torch.empty_like(v)
    for b in range(B):
        for h in range(H):
            allowed = torch.zeros(N, N, dtype=torch.bool)
            for i in range(n_chunks):
                rows = slice(i * C, min((i + 1) * C, N))
                selected: list = []
                if i >= 2:
                    route = q[b, h, (i - 1) * C : i * C].float().sum(0) / C
                    scores = [float(route @ k[b, h, j * C : (j + 1) * C].float().mean(0)) for j in range(i - 1)]
                    selected = sorted(range(i - 1), key=lambda j: -scores[j])[:top_k]
                for j in selected + ([i - 1] if i >= 1 else []):
                    allowed[rows, j * C : (j + 1) * C] = True
                for t in range(rows.start, rows.stop):
                    allowed[t, i * C : t + 1] = True
            scores = (q[b, h] @ k[b, h].transpose(0, 1)) * D**-0.5
            out[b, h] = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v[b, h]
    return out
