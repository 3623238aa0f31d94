"""Routing recall: does a retrieval layer pick the chunk that holds the answer?

For a synthetic QA batch the answer of every query sits at a known position (``source_positions``: the
fact's value token). A query token of chunk c reads its own chunk and chunk c - 1 in full (local context)
and routes to top_k of the chunks before them. Per retrieval layer and query:

- local: the answer's chunk is c or c - 1; it is read whatever the routing does (counts as found);
- found: otherwise, the answer's chunk is among the query token's valid top-k picks (per head).

``summarize`` reports ``recall`` (found or local, through at least one head), ``recall_far`` (found, among
the queries whose answer is beyond the local context: the part the routing decides), its per-head mean, and
``chance_far``: what a router picking top_k eligible chunks uniformly at random would get.
"""

from typing import Dict, List, Optional

import torch

from hydralm.eval.scoring import DEPTH_BUCKETS


def routing_hits(entries: List[dict], query_positions: torch.Tensor, source_positions: torch.Tensor) -> dict:
    """Per-query routing outcome from one layer's log entries (modules/routing_log.py) covering the queries.

    query_positions / source_positions (B, Q): where each answer is asked and where it sits in the context.
    Returns local (B, Q) bool, found (B, H, Q) bool (the head picked the answer's chunk) and chance (B, H, Q):
    the probability that a uniformly random choice of that head's picks among the eligible chunks holds it.
    """
    if not entries:
        raise ValueError("routing_hits needs the routing log of at least one call (was record_routing on?)")
    C = entries[0]["chunk_size"]
    B, H, _, k = entries[0]["chunks"].shape
    Q, device = query_positions.shape[1], entries[0]["chunks"].device
    query_positions, source_positions = query_positions.to(device), source_positions.to(device)
    chunks = torch.zeros(B, H, Q, k, dtype=torch.long, device=device)
    valid = torch.zeros(B, H, Q, k, dtype=torch.bool, device=device)
    first = torch.zeros(B, Q, dtype=torch.long, device=device)
    covered = torch.zeros(B, Q, dtype=torch.bool, device=device)
    for entry in entries:
        start, n = int(entry["positions"][0]), entry["positions"].shape[0]
        rows, cols = ((query_positions >= start) & (query_positions < start + n)).nonzero(as_tuple=True)
        at = query_positions[rows, cols] - start
        chunks[rows, :, cols] = entry["chunks"][rows, :, at]
        valid[rows, :, cols] = entry["valid"][rows, :, at]
        first[rows, cols] = entry["first_chunk"]
        covered[rows, cols] = True
    if not covered.all():
        missing = query_positions[~covered].tolist()
        raise ValueError(f"the routing log holds no entry for query positions {missing[:8]}")
    if (source_positions >= query_positions).any():
        raise ValueError("source_positions must precede their query_positions (the answer is in the past)")
    own, answer = query_positions // C, source_positions // C
    local = answer >= own - 1
    found = ((chunks == answer[:, None, :, None]) & valid).any(-1) & ~local[:, None]
    eligible = (own - 1 - first).clamp(min=1)[:, None].float()  # chunks a query may route to (>= 1 when far)
    chance = (valid.sum(-1).float() / eligible).clamp(max=1.0)
    return {"local": local, "found": found, "chance": chance}


def merge_hits(parts: List[dict]) -> dict:
    """Hits of several batches as one (queries along the batch axis)."""
    return {key: torch.cat([p[key].cpu() for p in parts], dim=0) for key in ("local", "found", "chance")}


def _mean(x: torch.Tensor) -> Optional[float]:
    return float(x.double().sum()) / x.numel() if x.numel() else None


def summarize(hits: dict, depths: Optional[torch.Tensor] = None, correct: Optional[torch.Tensor] = None) -> Dict:
    """JSON-able routing recall of one layer (overall and, with depths (B, Q), by depth bucket). With correct (B, Q)
    (whether each answer was right) also the accuracy of the answers in the local context and of the far ones this
    layer found or missed: where accuracy stays low although the routing found the chunk, reading is the limit."""
    local, found, chance = hits["local"].cpu(), hits["found"].cpu(), hits["chance"].cpu()
    any_head = found.any(1)
    far = ~local
    # a uniformly random router: each head misses with probability 1 - chance, independently
    chance_any = 1 - (1 - chance).prod(1)
    result = {
        "recall": _mean(local | any_head),
        "recall_far": _mean(any_head[far]),
        "recall_far_per_head": _mean(found.float().mean(1)[far]),
        "chance_far": _mean(chance_any[far]),
        "local_fraction": _mean(local),
        "queries": int(local.numel()),
        "far_queries": int(far.sum()),
    }
    if correct is not None:
        correct = correct.cpu().reshape(local.shape).double()
        result["accuracy_local"] = _mean(correct[local])
        result["accuracy_far_found"] = _mean(correct[far & any_head])
        result["accuracy_far_missed"] = _mean(correct[far & ~any_head])
    if depths is not None:
        depths = depths.cpu()
        result["by_depth"] = {}
        for lo, hi in DEPTH_BUCKETS:
            inside = (depths >= lo) & ((depths < hi) if hi < 1.0 else (depths <= hi))
            result["by_depth"][f"{int(lo * 100)}-{int(hi * 100)}"] = {
                "recall": _mean((local | any_head)[inside]),
                "recall_far": _mean(any_head[inside & far]),
                "chance_far": _mean(chance_any[inside & far]),
                "queries": int(inside.sum()),
                "far_queries": int((inside & far).sum()),
            }
    return result
