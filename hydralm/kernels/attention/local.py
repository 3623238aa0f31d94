"""Causal softmax attention over a key stream that may start before the queries (a cache).

Queries (B, H, N, D) sit at key positions ``q_offset .. q_offset + N - 1`` of keys/values (B, H, M, D),
M = q_offset + N. ``window=None`` is full causal attention (the dense baseline); an integer window lets
query i see the ``window`` keys ending at itself.

The windowed path never builds an N x M score matrix: queries are cut into blocks and each block attends
to the band of keys it can see, so work and memory are O(N * (window + block)).
"""

from typing import Optional

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, ..., D) -> (B, H_kv * n_rep, ..., D): grouped-query heads share a key/value head."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """Full causal attention; q_offset > 0 when a cache precedes the queries."""
    if q_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    N, M = q.shape[-2], k.shape[-2]
    allowed = torch.arange(M, device=q.device)[None, :] <= (q_offset + torch.arange(N, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, q_offset: int = 0, block: Optional[int] = None
) -> torch.Tensor:
    """Banded causal attention: query i sees keys j with q_offset + i - window < j <= q_offset + i."""
    B, H, N, D = q.shape
    M = k.shape[-2]
    if N == 0:
        return q.new_zeros(B, H, 0, v.shape[-1])
    block = min(N, block or max(window, 16))
    n_blocks = -(-N // block)
    span = block + window - 1  # keys one block of queries can see
    # Left-pad by window - 1 so every block's band starts at a valid index; right-pad the last block.
    right = q_offset + n_blocks * block - M
    kp = F.pad(k, (0, 0, window - 1, right))
    vp = F.pad(v, (0, 0, window - 1, right))
    # Block b's band starts at padded index q_offset + b * block.
    # Blocks become extra heads: 4-D inputs reach SDPA's fused CPU/GPU kernels (5-D falls back to math).
    k_blocks = kp[:, :, q_offset:].unfold(2, span, block).transpose(-1, -2).reshape(B, H * n_blocks, span, D)
    v_blocks = vp[:, :, q_offset:].unfold(2, span, block).transpose(-1, -2).reshape(B, H * n_blocks, span, -1)
    q_blocks = F.pad(q, (0, 0, 0, n_blocks * block - N)).reshape(B, H * n_blocks, block, D)

    row = torch.arange(block, device=q.device)[:, None]
    col = torch.arange(span, device=q.device)[None, :]
    band = (col >= row) & (col <= row + window - 1)  # same band for every block
    # Key index in the original stream; negative ones are the left padding.
    key_index = q_offset + torch.arange(n_blocks, device=q.device)[:, None] * block - (window - 1) + col
    mask = band[None] & (key_index >= 0)[:, None, :]  # (nb, block, span), the same for every head
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask.repeat(H, 1, 1))
    return out.reshape(B, H, n_blocks * block, -1)[:, :, :N]
