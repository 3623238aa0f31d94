"""flex_attention for the parallel forward of sliding-window attention (CUDA; the CPU forward runs too, which
the tests use to check the mask against local.py), and the compiled flex call retrieval/flex.py shares.

The SWA block mask is built on the device and cached per (length, window, device).
"""

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

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


def flex(q, k, v, block_mask):
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


@functools.lru_cache(maxsize=32)
def _sliding_window_mask(length: int, window: int, device: str) -> BlockMask:
    """The block mask from its block structure, O((length / TILE)^2) int32 at most: `create_block_mask` evaluates
    the mask on a dense length x length grid (41 GiB at 64k tokens, out of memory beyond)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    n = -(-length // TILE)
    q_block = torch.arange(n, device=device)[:, None]
    distance = q_block - torch.arange(n, device=device)[None, :]  # query block - key block
    # some query of the block sees some key of the other: the diagonal, or a pair closer than the window
    touched = (distance == 0) | ((distance >= 1) & ((distance - 1) * TILE + 1 < window))
    full = (distance >= 1) & ((distance + 1) * TILE - 1 < window)  # every pair inside the window
    partial = touched & ~full

    def ordered(blocks: torch.Tensor):  # per query block: how many, and their ids first in ascending order
        ids = torch.where(blocks, torch.arange(n, device=device), n).sort(dim=-1).values
        return blocks.sum(-1, dtype=torch.int32)[None, None], ids.clamp(max=n - 1).to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(length, length)
    )


def sliding_window_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """q (B, H, N, D), k/v (B, H_kv, N, D), no cache: query i sees keys i - window < j <= i."""
    return flex(q, k, v, _sliding_window_mask(q.shape[2], window, str(q.device)))
