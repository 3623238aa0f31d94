"""Retrieval attention through flex_attention (CUDA parallel forward from scratch; the CPU forward runs too,
which the tests use to check the mask against reference.py).

The block mask comes from the routing of each call, built on the device (no host syncs): a 128-query tile
visits the union of the chunks its tokens selected plus its local chunks, and the mask_mod keeps every
token on its own selection; kv tiles that every query of the tile reads in full are passed as full blocks,
which skip the mask_mod.
"""

from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask

from hydralm.kernels.attention.flex import TILE, flex
from hydralm.kernels.retrieval.routing import route_tokens


def flex_retrieval_supported(length: int, chunk_size: int) -> bool:
    """The tiling needs whole tiles and chunks that fit a tile evenly (C in 1, 2, 4, ..., 128)."""
    return length % TILE == 0 and chunk_size <= TILE and TILE % chunk_size == 0


def retrieval_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, top_k: int, route_block: Optional[int] = 8192
) -> torch.Tensor:
    """Token-routed chunk-sparse attention from scratch (no state), same semantics as
    kernels/retrieval/: token t of chunk i sees chunk i-1, chunk i up to t, and its top_k chunks
    among 0 .. i-2 by q_t . mean(keys of the chunk)."""
    return flex(q, k, v, retrieval_block_mask(q, k, chunk_size, top_k, route_block))


def retrieval_block_mask(
    q: torch.Tensor, k: torch.Tensor, chunk_size: int, top_k: int, route_block: Optional[int] = 8192
) -> BlockMask:
    """The routing of `retrieval_flex` as a BlockMask: partial tiles carry the per-token mask_mod, full tiles
    (read in full by every query of the tile) skip it."""
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
    full = _full_tiles(selected, token_chunk, n_chunks, n_tiles)
    partial = member & ~full

    def as_blocks(tiles):
        return (
            tiles.sum(-1, dtype=torch.int32),
            torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32),
        )

    kv_num_blocks, kv_indices = as_blocks(partial)
    full_num_blocks, full_indices = as_blocks(full)

    def mask_mod(b, h, q_idx, kv_idx):
        q_chunk, kv_chunk = q_idx // C, kv_idx // C
        keep = ((kv_chunk == q_chunk) & (kv_idx <= q_idx)) | (kv_chunk == q_chunk - 1)
        for slot in range(top_k):
            keep = keep | (selected[b, h, q_idx, slot] == kv_chunk)
        return keep

    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_num_blocks, full_indices, BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(N, N)
    )


def _full_tiles(selected: torch.Tensor, token_chunk: torch.Tensor, n_chunks: int, n_tiles: int) -> torch.Tensor:
    """(B, H, query tile, kv tile): every query of the tile reads every key of the kv tile, so the kernel
    can skip mask_mod there (when a tile's tokens route alike, most visited tiles are such full tiles).
    A chunk is read in full by a query that selected it or whose previous chunk it is (never both: routing
    stops two chunks back), so a kv tile is full when each of its chunks has TILE such readers."""
    B, H, N, top_k = selected.shape
    ids = torch.where(selected >= 0, selected, n_chunks).reshape(B, H, n_tiles, TILE * top_k).long()
    readers = torch.zeros(B, H, n_tiles, n_chunks + 1, dtype=torch.int32, device=selected.device)
    readers.scatter_add_(-1, ids, torch.ones_like(ids, dtype=torch.int32))
    previous = torch.where(token_chunk > 0, token_chunk - 1, n_chunks).reshape(n_tiles, TILE)
    local = torch.zeros(n_tiles, n_chunks + 1, dtype=torch.int32, device=selected.device)
    local.scatter_add_(-1, previous, torch.ones_like(previous, dtype=torch.int32))
    full_chunks = (readers + local)[..., :n_chunks] == TILE
    return full_chunks.unflatten(-1, (n_tiles, n_chunks // n_tiles)).all(-1)
