"""Compressive memory: three tiers that bound the key/value stream of a softmax layer (Compressive
Transformer, Rae et al. 2020, adapted to chunked streams).

  tier 1  exact window: the most recent ``exact_window`` tokens, kept exactly;
  tier 2  pool: older tokens, every ``compress_every`` of them squeezed into one learned summary slot,
          at most ``pool_size`` slots;
  tier 3  tombstones: when the pool is full its oldest slots are evicted and only counted.

Memory is O(exact_window + pool_size) whatever the stream length. The compressor is attention pooling
with one learned query per key/value head: slot = softmax(w_h . k_j / sqrt(D)) weighted mean of the
block's keys and values. It learns from the attention-reconstruction loss: attention of real queries over
the original block versus over its compressed slots, with the attention inputs detached so the loss
trains only the compressor (as in the Compressive Transformer).

The module is framework-agnostic: it transforms (B, H, L, D) key/value tensors. Layers decide what a block
is (the retrieval layer compresses whole chunks once they leave the exact window; see
modules/retrieval_attention.py and docs/inference.md).
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class CompressiveMemory(nn.Module):
    def __init__(self, n_heads: int, head_dim: int, exact_window: int, compress_every: int, pool_size: int):
        super().__init__()
        for name, value in (
            ("exact_window", exact_window),
            ("compress_every", compress_every),
            ("pool_size", pool_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CompressiveMemory.{name}={value!r} is invalid: expected an integer >= 1")
        self.n_heads, self.head_dim = n_heads, head_dim
        self.exact_window, self.compress_every, self.pool_size = exact_window, compress_every, pool_size
        # zero init = plain mean pooling at the start; training sharpens it towards what queries read
        self.pool_query = nn.Parameter(torch.zeros(n_heads, head_dim))

    def compress(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, L, D), L a multiple of compress_every -> (B, H, L / compress_every, D) each."""
        B, H, L, D = k.shape
        if L % self.compress_every:
            raise ValueError(f"compress: length {L} is not a multiple of compress_every={self.compress_every}")
        r = self.compress_every
        kb, vb = k.reshape(B, H, L // r, r, D), v.reshape(B, H, L // r, r, D)
        logits = torch.einsum("bhnrd,hd->bhnr", kb.float(), self.pool_query.float()) * D**-0.5
        weights = torch.softmax(logits, dim=-1)[..., None]
        return (weights * kb.float()).sum(-2).to(k.dtype), (weights * vb.float()).sum(-2).to(v.dtype)

    def reconstruction_loss(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention-reconstruction loss: || attn(q, k, v) - attn(q, compress(k, v)) ||^2, mean over
        elements. q (B, H_q, Q, D) queries that read the block; k, v (B, H, L, D) with H dividing H_q.
        Only the compressor learns."""
        q, k, v = q.detach().float(), k.detach().float(), v.detach().float()
        groups = q.shape[1] // k.shape[1]  # grouped-query heads share a key/value head
        target = F.scaled_dot_product_attention(q, *(t.repeat_interleave(groups, dim=1) for t in (k, v)))
        kc, vc = self.compress(k, v)
        approx = F.scaled_dot_product_attention(q, *(t.repeat_interleave(groups, dim=1) for t in (kc, vc)))
        return F.mse_loss(approx, target)

    def extra_repr(self) -> str:
        return (
            f"heads={self.n_heads}, head_dim={self.head_dim}, exact_window={self.exact_window}, "
            f"compress_every={self.compress_every}, pool_size={self.pool_size}"
        )
