"""A read-only log of retrieval routing: which past chunks each query token of a retrieval layer picked.

A ``RetrievalAttention`` whose ``routing_log`` is a list appends one ``routing_entry`` per call (a parallel
forward, a prefill piece or a decode step); ``record_routing(model)`` switches that on for every retrieval
layer of a model inside a ``with`` block. The log copies nothing the layer computes and changes none of it;
hydralm/eval/routing_recall.py turns it into routing recall.
"""

from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch
from torch import nn


def routing_entry(selected: torch.Tensor, valid: torch.Tensor, state: dict, chunk_size: int) -> dict:
    """One call's routing in absolute terms.

    selected / valid (B, H, N, k): the layer's chunk ids (compressed pool first, then the exact bank) for the
    call's N tokens; state: the layer state *before* the call. Returns positions (N,) of the tokens in the
    stream, chunks (B, H, N, k) as absolute chunk ids (chunk j holds stream tokens j*C .. j*C + C - 1), valid,
    first_chunk (the oldest chunk still retrievable: older ones were evicted by the compressive memory) and
    chunk_size.
    """
    n_pool = state.get("n_pool", 0)
    in_pool = selected < n_pool
    chunks = torch.where(in_pool, selected + state.get("evicted", 0), selected - n_pool + state.get("compressed", 0))
    positions = state["pos"] + torch.arange(selected.shape[2], device=selected.device)
    return {
        "positions": positions,
        "chunks": chunks.detach(),
        "valid": valid.detach(),
        "first_chunk": state.get("evicted", 0),
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
