"""Sliding-window attention with RoPE and a ring KV cache of exactly `swa_window` entries.

State: SlidingWindowState(k, v (B, H_kv, window, D) ring buffers of rotated keys / values, pos tokens seen).
Token p lives in slot p % window; softmax is order-free, so the ring never needs to be unrolled to decode. The
step reads the whole ring under a mask of the slots written so far: one shape at every step.
"""

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.attention.local import repeat_kv, sliding_window_attention
from hydralm.kernels.backend import attention_backend
from hydralm.modules.attention import AttentionProjections, check_rotary_head_dim
from hydralm.modules.mixer import Counter, LayerState
from hydralm.modules.rotary import Rotary
from hydralm.modules.slots import positions, write_slot


@dataclass
class SlidingWindowState(LayerState):
    k: torch.Tensor  # (B, H_kv, window, D) rotated keys, token p in slot p % window
    v: torch.Tensor  # (B, H_kv, window, D)
    pos: Counter  # tokens seen

    COUNTERS: ClassVar[Tuple[str, ...]] = ("pos",)

    def contents(self) -> Dict[str, object]:
        """Only the written slots: slots the stream has not reached yet hold nothing."""
        valid = min(int(self.pos), self.k.shape[2])
        return {"k": self.k[:, :, :valid], "v": self.v[:, :, :valid], "pos": int(self.pos)}


class SlidingWindowAttention(nn.Module):
    state_class = SlidingWindowState

    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.window = cfg.swa_window
        self.proj = AttentionProjections(cfg)
        self.rotary = Rotary(cfg.resolved_head_dim, cfg.rope_base)

    @staticmethod
    def check_config(cfg: HydraConfig) -> None:
        check_rotary_head_dim(cfg, "swa")

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> SlidingWindowState:
        shape = (batch_size, self.proj.n_kv_heads, self.window, self.proj.head_dim)
        return SlidingWindowState(
            k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype), pos=0
        )

    def state_growth(self) -> Optional[str]:
        return None  # the ring holds exactly `window` slots

    def forward(
        self, x: torch.Tensor, state: Optional[SlidingWindowState] = None
    ) -> Tuple[torch.Tensor, SlidingWindowState]:
        B, N, _ = x.shape
        pos0 = 0 if state is None else int(state.pos)
        q, k, v = self.proj.split(x)
        positions = torch.arange(pos0, pos0 + N, device=x.device)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if state is not None and pos0 > 0:
            k = torch.cat([_ring_to_sequence(state.k, pos0).to(k.dtype), k], dim=2)
            v = torch.cat([_ring_to_sequence(state.v, pos0).to(v.dtype), v], dim=2)
        cached = k.shape[2] - N
        groups = self.proj.kv_groups
        if cached == 0 and attention_backend(x.is_cuda) == "flex":
            from hydralm.kernels.attention.flex import sliding_window_flex

            y = sliding_window_flex(q, k, v, self.window)
        else:
            y = sliding_window_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), self.window, q_offset=cached)
        end = pos0 + N
        new_state = SlidingWindowState(
            k=_sequence_to_ring(k, end, self.window), v=_sequence_to_ring(v, end, self.window), pos=end
        )
        return self.proj.merge(y), new_state

    def step(self, x_t: torch.Tensor, state: SlidingWindowState) -> Tuple[torch.Tensor, SlidingWindowState]:
        """x_t (B, d_model) -> (B, d_model); O(window) work, O(window) memory, one shape at every step."""
        pos = state.pos
        q, k, v = self.proj.split(x_t[:, None])
        position = positions(pos, 1, x_t.device)
        q, k = self.rotary(q, position), self.rotary(k, position)
        # written into copies (states are values: callers may roll back to the old one)
        ring_k = write_slot(state.k, 2, pos % self.window, k[:, :, 0])
        ring_v = write_slot(state.v, 2, pos % self.window, v[:, :, 0])
        written = torch.arange(self.window, device=x_t.device) <= pos  # all slots once the ring has wrapped
        groups = self.proj.kv_groups
        y = F.scaled_dot_product_attention(
            q,
            repeat_kv(ring_k.to(q.dtype), groups),
            repeat_kv(ring_v.to(q.dtype), groups),
            attn_mask=written.view(1, 1, 1, self.window),
        )
        return self.proj.merge(y)[:, 0], SlidingWindowState(k=ring_k, v=ring_v, pos=pos + 1)


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
