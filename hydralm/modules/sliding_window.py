"""Sliding-window attention with RoPE and a ring KV cache of exactly `swa_window` entries.

State: {"k", "v": (B, H_kv, window, D) ring buffers of rotated keys / values, "pos": tokens seen}.
Token p lives in slot p % window; softmax is order-free, so the ring never needs to be unrolled to decode.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.attention.local import repeat_kv, sliding_window_attention
from hydralm.kernels.backend import attention_backend
from hydralm.modules.attention import AttentionProjections
from hydralm.modules.rotary import Rotary


class SlidingWindowAttention(nn.Module):
    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.window = cfg.swa_window
        self.proj = AttentionProjections(cfg)
        self.rotary = Rotary(cfg.resolved_head_dim, cfg.rope_base)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        shape = (batch_size, self.proj.n_kv_heads, self.window, self.proj.head_dim)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": 0,
        }

    def forward(self, x: torch.Tensor, state: Optional[dict] = None):
        B, N, _ = x.shape
        pos0 = 0 if state is None else state["pos"]
        q, k, v = self.proj.split(x)
        positions = torch.arange(pos0, pos0 + N, device=x.device)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if pos0 > 0:
            k = torch.cat([_ring_to_sequence(state["k"], pos0).to(k.dtype), k], dim=2)
            v = torch.cat([_ring_to_sequence(state["v"], pos0).to(v.dtype), v], dim=2)
        cached = k.shape[2] - N
        groups = self.proj.kv_groups
        if cached == 0 and attention_backend(x.is_cuda) == "flex":
            from hydralm.kernels.attention.flex import sliding_window_flex

            y = sliding_window_flex(q, k, v, self.window)
        else:
            y = sliding_window_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), self.window, q_offset=cached)
        end = pos0 + N
        new_state = {
            "k": _sequence_to_ring(k, end, self.window),
            "v": _sequence_to_ring(v, end, self.window),
            "pos": end,
        }
        return self.proj.merge(y), new_state

    def step(self, x_t: torch.Tensor, state: dict):
        """x_t (B, d_model) -> (B, d_model); O(window) work, O(window) memory."""
        pos = state["pos"]
        q, k, v = self.proj.split(x_t[:, None])
        # Python ints only: a tensor made from host data on a GPU would synchronise host and device per token.
        position = torch.arange(pos, pos + 1, device=x_t.device)
        q, k = self.rotary(q, position), self.rotary(k, position)
        # write into a copy (not in place): the old state stays intact, callers may roll back to it.
        ring_k, ring_v = state["k"].clone(), state["v"].clone()
        ring_k[:, :, pos % self.window] = k[:, :, 0].to(ring_k.dtype)
        ring_v[:, :, pos % self.window] = v[:, :, 0].to(ring_v.dtype)
        valid = min(pos + 1, self.window)  # before the first wrap only slots 0..pos are filled
        groups = self.proj.kv_groups
        y = F.scaled_dot_product_attention(
            q, repeat_kv(ring_k[:, :, :valid].to(q.dtype), groups), repeat_kv(ring_v[:, :, :valid].to(q.dtype), groups)
        )
        return self.proj.merge(y)[:, 0], {"k": ring_k, "v": ring_v, "pos": pos + 1}


def _ring_to_sequence(ring: torch.Tensor, pos: int) -> torch.Tensor:
    """The cached keys in stream order (oldest first): min(pos, window) entries."""
    window = ring.shape[2]
    if pos < window:
        return ring[:, :, :pos]
    return torch.roll(ring, shifts=-(pos % window), dims=2)


def _sequence_to_ring(seq: torch.Tensor, end: int, window: int) -> torch.Tensor:
    """The ring holding the last `window` entries of a stream ending at position `end` (exclusive)."""
    B, H, L, D = seq.shape
    if end < window:  # the stream so far fits: tokens 0..end-1 in slots 0..end-1
        return F.pad(seq, (0, 0, 0, window - L))
    # entry e of the last `window` tokens has position end - window + e -> slot (end + e) % window
    return torch.roll(seq[:, :, L - window :], shifts=end % window, dims=2)
