"""Token-level causal routing of retrieval attention: each query's top-k past chunks by q . summary.

A chunk's summary is the mean of its keys (fp32). A token of chunk i may pick among chunks 0 .. i-2 (its
previous chunk is always read in full, as local context), so routing reads only the past: the parallel
forward, chunked prefill and decoding pick the same chunks (C1).

Ties are broken towards the lowest chunk id (`topk_lowest_id`), as the dense reference does: torch.topk
leaves the order of equal values unspecified, and it differs with the number of columns, so two paths that
score the same chunks in differently shaped calls could otherwise pick different ones.

`route_tokens` scores a block of queries against every summary it is given; `route_tokens_blocked` is the
from-scratch routing of a whole sequence in blocks of queries, each scored only against the chunks its tokens
may pick, so no (B, H, N, N / C) score tensor is ever built; `route_sequence` routes a sequence with the Triton
kernel of triton_routing.py on CUDA (the same selections, without any score tensor in memory) and with
`route_tokens_blocked` elsewhere.
"""

from typing import List, Optional, Tuple

import torch


def topk_lowest_id(
    scores: torch.Tensor, k: int, ids: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.topk over the last dim with ties broken towards the lowest index: (values, indices), ordered by
    value descending, then index ascending. Needs no host synchronisation (CUDA-graph safe).

    ids: (n,) int64, an id per column (distinct among finite scores; e.g. the chunk each ring slot holds): ties
    then go to the lowest id, and the order is value descending, then id ascending; indices still point into
    `scores`. Cheaper than permuting the columns into id order (a sort per call).

    fp32 (and narrower) scores take one topk over an int64 key that orders by score, then by lowest index (id):
    the score's bits mapped to an order-preserving int32 in the high half, the reversed index (id) in the low
    half. Wider scores take a slower exact path."""
    if scores.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return _topk_lowest_id_packed(scores.float(), k, ids)
    if ids is not None:
        by_id = ids.argsort()
        top, rank = topk_lowest_id(scores[..., by_id], k)
        return top, by_id[rank]
    top, idx = scores.topk(k, dim=-1)
    kth = top[..., -1:]
    n_above = (top > kth).sum(-1, keepdim=True)  # every value above the k-th one is in `top`
    # the remaining k - n_above slots take the lowest indices whose score equals the k-th value
    rank = (scores == kth).cumsum(-1, dtype=torch.int32)
    wanted = torch.arange(1, k + 1, dtype=torch.int32, device=scores.device).expand(*rank.shape[:-1], k)
    nth_tie = torch.searchsorted(rank.contiguous(), wanted.contiguous())  # index of the 1st, 2nd, ... tie
    slots = torch.arange(k, device=scores.device)
    tie = nth_tie.gather(-1, (slots - n_above).clamp(min=0))
    idx = torch.where(slots < n_above, idx, tie)
    # order: value descending, index ascending (sort by index, then a stable sort by value)
    idx = idx.sort(dim=-1).values
    values = scores.gather(-1, idx)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, idx.gather(-1, order)


def _topk_lowest_id_packed(
    scores: torch.Tensor, k: int, ids: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    n = scores.shape[-1]
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: equal scores, equal keys
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits (monotone int32)
    if ids is None:
        low = n - 1 - torch.arange(n, device=scores.device, dtype=torch.int64)  # lower index, larger key
    else:
        low = 0xFFFFFFFF - (ids - ids.min())  # lower id, larger key (ids span less than 2^32)
    key = (ordered.to(torch.int64) << 32) | low
    idx = key.topk(k, dim=-1).indices
    return scores.gather(-1, idx), idx


def route_tokens(
    q: torch.Tensor,
    summary_parts: List[torch.Tensor],
    n_eligible: torch.Tensor,
    top_k: int,
    first_eligible: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k past chunks for every query.

    q: (B, H, ..., D) queries; summary_parts: chunk summaries (B, H_kv, n_p, D) in global chunk order
    (kept as parts so the caller's bank is never copied); n_eligible: broadcastable to q's middle dims
    (...,): a query may pick chunks j < n_eligible; first_eligible (same shape, optional): and j >= first_eligible
    (the compressive memory has evicted the older ones).
    Returns chunk ids (B, H, ..., top_k) and a validity mask of the same shape.
    """
    B, H = q.shape[:2]
    middle = q.shape[2:-1]
    scores = torch.cat([_scores(q, s) for s in summary_parts], dim=-1)
    scores = scores.reshape(B, H, *middle, -1)
    n_total = scores.shape[-1]
    selected = torch.zeros(B, H, *middle, top_k, dtype=torch.long, device=q.device)
    valid = torch.zeros(B, H, *middle, top_k, dtype=torch.bool, device=q.device)
    k = min(top_k, n_total)
    if k == 0:
        return selected, valid
    ids = torch.arange(n_total, device=q.device)
    eligible = ids < n_eligible[..., None]
    if first_eligible is not None:
        eligible = eligible & (ids >= first_eligible[..., None])
    top, idx = topk_lowest_id(scores.masked_fill(~eligible, float("-inf")), k)
    selected[..., :k] = idx
    valid[..., :k] = torch.isfinite(top)
    return selected, valid


def route_tokens_blocked(
    q: torch.Tensor, summaries: torch.Tensor, chunk_size: int, top_k: int, block: int = 4096
) -> torch.Tensor:
    """The from-scratch routing of a whole sequence: token t of chunk i = t // C picks its top_k chunks among
    0 .. i-2. q (B, H, N, D), summaries (B, H_kv, >= N // C, D) -> chunk ids (B, H, N, top_k) int32, -1 where
    fewer than top_k chunks are eligible. Equal to `route_tokens` with n_eligible = i - 1.

    Queries are scored `block` at a time against only the chunks the block's tokens may pick, so the largest
    score tensor is (B, H, block, N / C) and the routing cost is O(N^2 / (2 C) * D) per head."""
    B, H, N, _ = q.shape
    C = chunk_size
    selected = torch.full((B, H, N, top_k), -1, dtype=torch.int32, device=q.device)
    first_routed = 2 * C  # tokens of chunks 0 and 1 have nothing to pick
    for start in range(first_routed - first_routed % block, N, block):
        end = min(N, start + block)
        lo = max(start, first_routed)
        if lo >= end:
            continue
        n_cols = (end - 1) // C - 1  # the last token of the block may pick chunks 0 .. n_cols - 1
        scores = _scores(q[:, :, lo:end], summaries[:, :, :n_cols])  # (B, H, rows, n_cols)
        n_eligible = torch.arange(lo, end, device=q.device) // C - 1
        eligible = torch.arange(n_cols, device=q.device) < n_eligible[:, None]
        k = min(top_k, n_cols)
        top, idx = topk_lowest_id(scores.masked_fill(~eligible, float("-inf")), k)
        selected[:, :, lo:end, :k] = torch.where(torch.isfinite(top), idx, -1).to(torch.int32)
    return selected


def chunk_summaries(k: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """k (B, H_kv, N, D) -> the mean key of every completed chunk, (B, H_kv, N // C, D) fp32."""
    n_chunks = k.shape[2] // chunk_size
    return k[:, :, : n_chunks * chunk_size].float().unflatten(2, (n_chunks, chunk_size)).mean(-2)


def route_sequence(q: torch.Tensor, k: torch.Tensor, chunk_size: int, top_k: int, block: int = 4096) -> torch.Tensor:
    """The from-scratch routing of q (B, H, N, D) against the chunks of k (B, H_kv, N, D): (B, H, N, top_k)
    int32 chunk ids, -1 = none. The Triton kernel on CUDA; `route_tokens_blocked` (blocks of `block` queries)
    elsewhere, including Triton's CPU interpreter, which runs the kernel's sorting network very slowly."""
    with torch.no_grad():
        summaries = chunk_summaries(k, chunk_size)
        if q.is_cuda:
            from hydralm.kernels.retrieval.triton_routing import route_tokens_triton

            return route_tokens_triton(q, summaries, chunk_size, top_k)
        return route_tokens_blocked(q, summaries, chunk_size, top_k, block)


def _scores(q: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """q (B, H, ..., D) . summaries (B, H_kv, n, D) in fp32 at least -> (B, H, prod(...), n); query head h reads
    the summaries of key head h // (H / H_kv)."""
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    h_kv = summaries.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    rows = q.to(dtype).reshape(B, h_kv, H // h_kv, -1, D)
    # (B, H_kv, G, R, D) @ (B, H_kv, 1, D, n): query heads of a group share their key head's summaries.
    scores = rows @ summaries.to(dtype).transpose(-1, -2)[:, :, None]
    return scores.reshape(B, H, rows.shape[3], summaries.shape[2])
