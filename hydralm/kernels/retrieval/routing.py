"""Token-level causal routing of retrieval attention: each query's top-k past chunks by q . summary.

A chunk's summary is the mean of its keys (fp32). A token of chunk i may pick among chunks 0 .. i-2 (its
previous chunk is always read in full, as local context), so routing reads only the past: the parallel
forward, chunked prefill and decoding pick the same chunks (C1).

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
