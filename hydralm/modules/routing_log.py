"""A read-only log of retrieval routing: which past chunks each query token of a retrieval layer picked.

A ``RetrievalAttention`` whose ``routing_log`` is a list appends one ``routing_entry`` per call (a parallel
forward, a prefill piece or a decode step); ``record_routing(model)`` switches that on for every retrieval
layer of a model inside a ``with`` block. The log copies nothing the layer computes and changes none of it;
hydralm/eval/routing_recall.py turns it into routing recall.
"""

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

import torch
from torch import nn


def routing_entry(selected: torch.Tensor, valid: torch.Tensor, state: Any, chunk_size: int) -> Dict[str, Any]:
    """One parallel call's routing in absolute terms.

    selected / valid (B, H, N, k): the layer's chunk ids (compressed pool first, then the exact bank, each
    oldest first) for the call's N tokens; state: the layer's RetrievalState *before* the call. Returns
    positions (N,) of the tokens in the stream, chunks (B, H, N, k) as absolute chunk ids (chunk j holds stream
    tokens j*C .. j*C + C - 1), valid, first_chunk (the oldest chunk still retrievable: older ones were evicted
    by the compressive memory) and chunk_size.
    """
    n_pool = state.n_pool
    in_pool = selected < n_pool
    chunks = torch.where(in_pool, selected + state.evicted, selected - n_pool + state.compressed)
    return _entry(chunks, valid, state.pos, state.evicted, chunk_size)


def ring_routing_entry(chunks: torch.Tensor, valid: torch.Tensor, state: Any, top_k: int) -> Dict[str, Any]:
    """One decode step's routing: chunks / valid (B, H, 1, k <= top_k) already absolute chunk ids (the step
    reads the bank and pool as rings and maps their slots to chunks itself); padded to top_k picks like the
    parallel path's. state: the layer's RetrievalState before the step."""
    missing = top_k - chunks.shape[-1]
    if missing:
        chunks = torch.cat([chunks, chunks.new_zeros(*chunks.shape[:-1], missing)], dim=-1)
        valid = torch.cat([valid, valid.new_zeros(*valid.shape[:-1], missing)], dim=-1)
    return _entry(chunks, valid, state.pos, state.evicted, state.chunk_size)


def _entry(chunks: torch.Tensor, valid: torch.Tensor, pos: Any, first_chunk: int, chunk_size: int) -> Dict[str, Any]:
    return {
        "positions": pos + torch.arange(chunks.shape[2], device=chunks.device),
        "chunks": chunks.detach(),
        "valid": valid.detach(),
        "first_chunk": first_chunk,
        "chunk_size": chunk_size,
    }


def retrieval_layers(model: nn.Module) -> Dict[int, nn.Module]:
    """{block index: mixer} of the model's layers that log routing (none for a model without retrieval)."""
    blocks = getattr(model, "blocks", [])
    return {i: block.mixer for i, block in enumerate(blocks) if hasattr(block.mixer, "routing_log")}


def start_routing_log(model: nn.Module) -> Dict[int, List[dict]]:
    """Every retrieval layer starts logging into a fresh list; returns {block index: that list}."""
    logs = {}
    for i, layer in retrieval_layers(model).items():
        layer.routing_log = logs[i] = []
    return logs


def stop_routing_log(model: nn.Module) -> None:
    for layer in retrieval_layers(model).values():
        layer.routing_log = None


@contextmanager
def record_routing(model: nn.Module) -> Iterator[Dict[int, List[dict]]]:
    """``with record_routing(model) as logs:`` every call of retrieval layer i inside appends to ``logs[i]``."""
    logs = start_routing_log(model)
    try:
        yield logs
    finally:
        stop_routing_log(model)
