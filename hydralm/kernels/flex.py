"""flex_attention paths for the parallel forward of SWA and retrieval layers (CUDA; the CPU forward runs
too, which the tests use to check the masks against the reference paths).

Block masks are built on the device from tensors (no host syncs): SWA's is cached per (length, window,
device); retrieval's comes from the routing of each call: a 128-query tile visits the union of the chunks
its tokens selected plus its local chunks, and the mask_mod keeps every token on its own selection.
"""

import functools
from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from hydralm.kernels.chunk_retrieval import route_tokens

TILE = 128  # flex's default block size


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    # Uncompiled flex_attention is a slow reference; compiled it is a fused Triton kernel. Each new shape
    # compiles once (dynamic=False); past dynamo's default limit of 8 shapes it would silently fall back to
    # the eager reference, which materialises the scores (measured: 1.7 s steps and OOMs in a process that
    # benchmarks several lengths), so the limit is raised for long-lived processes (eval, serving, benchmarks).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask):
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


@functools.lru_cache(maxsize=32)
def _sliding_window_mask(length: int, window: int, device: str) -> BlockMask:
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(mask_mod, None, None, length, length, device=device)


def sliding_window_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """q (B, H, N, D), k/v (B, H_kv, N, D), no cache: query i sees keys i - window < j <= i."""
    return _flex(q, k, v, _sliding_window_mask(q.shape[2], window, str(q.device)))


def flex_retrieval_supported(length: int, chunk_size: int) -> bool:
    """The tiling needs whole tiles and chunks that fit a tile evenly (C in 1, 2, 4, ..., 128)."""
    return length % TILE == 0 and chunk_size <= TILE and TILE % chunk_size == 0


def retrieval_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, top_k: int,
                   route_block: Optional[int] = 8192) -> torch.Tensor:
    """Token-routed chunk-sparse attention from scratch (no state), same semantics as
    kernels/chunk_retrieval.py: token t of chunk i sees chunk i-1, chunk i up to t, and its top_k chunks
    among 0 .. i-2 by q_t . mean(keys of the chunk)."""
    B, H, N, D = q.shape
    C = chunk_size
    n_chunks = N // C
    summaries = k.float().unflatten(2, (n_chunks, C)).mean(-2)  # (B, H_kv, n_chunks, D)
    token_chunk = torch.arange(N, device=q.device) // C
    selected = []
    for start in range(0, N, route_block or N):  # bounds the (tokens x chunks) score block
        end = min(N, start + (route_block or N))
        sel, valid = route_tokens(q[:, :, start:end], [summaries], (token_chunk[start:end] - 1).clamp(min=0), top_k)
        selected.append(torch.where(valid, sel, -1).to(torch.int32))
    selected = torch.cat(selected, dim=2)  # (B, H, N, k): chunk ids, -1 = none

    n_tiles = N // TILE
    tile_of_chunk = (torch.arange(n_chunks, device=q.device) * C) // TILE
    sel_tiles = torch.where(selected >= 0, tile_of_chunk[selected.clamp(min=0).long()], n_tiles)
    member = torch.zeros(B, H, n_tiles, n_tiles + 1, dtype=torch.bool, device=q.device)
    member.scatter_(-1, sel_tiles.reshape(B, H, n_tiles, TILE * top_k).long(), True)
    # local context of a tile: the tiles holding chunk (first chunk of the tile - 1) .. the tile itself
    tiles = torch.arange(n_tiles, device=q.device)
    first_local = (((tiles * TILE) // C - 1).clamp(min=0) * C) // TILE
    cols = torch.arange(n_tiles + 1, device=q.device)
    member |= ((cols[None, :] >= first_local[:, None]) & (cols[None, :] <= tiles[:, None]))[None, None]
    member = member[..., :n_tiles]
    kv_num_blocks = member.sum(-1, dtype=torch.int32)
    kv_indices = torch.argsort(member.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        q_chunk, kv_chunk = q_idx // C, kv_idx // C
        keep = ((kv_chunk == q_chunk) & (kv_idx <= q_idx)) | (kv_chunk == q_chunk - 1)
        for slot in range(top_k):
            keep = keep | (selected[b, h, q_idx, slot] == kv_chunk)
        return keep

    block_mask = BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=TILE, mask_mod=mask_mod,
                                          seq_lengths=(N, N))
    return _flex(q, k, v, block_mask)
