"""Sliding-window attention with RoPE and a ring KV cache of exactly `swa_window` entries.

State: SlidingWindowState(k, v (B, H_kv, window, D) ring buffers of rotated keys / values, pos tokens seen).
Token p lives in slot p % window; softmax is order-free, so the ring never needs to be unrolled to decode. The
step reads the whole ring under a mask of the slots written so far: one shape at every step. ``step_many`` reads
the ring and the T new keys under a per-query mask of the positions in its window and writes nothing; the ring
slots of the kept tokens are written by ``state_after`` (at most `window` tokens per piece, so no slot twice).
"""

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.attention.local import repeat_kv, sliding_window_attention
from hydralm.kernels.backend import attention_backend, decode_verify_backend, swa_decode_backend
from hydralm.modules.attention import AttentionProjections, check_rotary_head_dim
from hydralm.modules.linear import PLAIN_IO, BlockIO
from hydralm.modules.mixer import Counter, LayerState, Trail
from hydralm.modules.multi_token import kept_in_piece, pieces, ring_ids
from hydralm.modules.rotary import Rotary
from hydralm.modules.slots import positions, write_slot

FLEX_MIN_QUERIES = 128  # one flex tile (kernels/attention/flex.py)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the step kernel's (HYDRALM_SWA_DECODE)


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
        # flex for calls of at least one tile: below it torch compiles flex's decoding kernel, which has no
        # valid config for some shapes (fp32, head dim 32 on torch 2.11) and saves nothing over SDPA there
        if cached == 0 and N >= FLEX_MIN_QUERIES and attention_backend(x.is_cuda) == "flex":
            from hydralm.kernels.attention.flex import sliding_window_flex

            y = sliding_window_flex(q, k, v, self.window)
        else:
            y = sliding_window_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), self.window, q_offset=cached)
        end = pos0 + N
        new_state = SlidingWindowState(
            k=_sequence_to_ring(k, end, self.window), v=_sequence_to_ring(v, end, self.window), pos=end
        )
        return self.proj.merge(y), new_state

    def step(
        self, x_t: torch.Tensor, state: SlidingWindowState, io: BlockIO = PLAIN_IO
    ) -> Tuple[torch.Tensor, SlidingWindowState]:
        """x_t (B, d_model) -> (B, d_model); O(window) work, O(window) memory, one shape at every step."""
        pos = state.pos
        q, k, v = self.proj.split(x_t[:, None], io)
        position = positions(pos, 1, x_t.device)
        q, k = self.rotary(q, position), self.rotary(k, position)
        # written into copies (states are values: callers may roll back to the old one)
        ring_k = write_slot(state.k, 2, pos % self.window, k[:, :, 0])
        ring_v = write_slot(state.v, 2, pos % self.window, v[:, :, 0])
        kernel_dtypes = q.dtype in KERNEL_DTYPES and ring_k.dtype in KERNEL_DTYPES
        if kernel_dtypes and swa_decode_backend(x_t.is_cuda, x_t.shape[0]) == "triton":
            from hydralm.kernels.attention.triton_decode import sliding_window_decode

            y = sliding_window_decode(q[:, :, 0], ring_k, ring_v, pos)[:, :, None]  # the ring read in place
        else:
            written = torch.arange(self.window, device=x_t.device) <= pos  # all slots once the ring has wrapped
            groups = self.proj.kv_groups
            y = F.scaled_dot_product_attention(
                q,
                repeat_kv(ring_k.to(q.dtype), groups),
                repeat_kv(ring_v.to(q.dtype), groups),
                attn_mask=written.view(1, 1, 1, self.window),
            )
        return self.proj.merge(y, io)[:, 0], SlidingWindowState(k=ring_k, v=ring_v, pos=pos + 1)

    def step_many(
        self, x: torch.Tensor, state: SlidingWindowState, io: BlockIO = PLAIN_IO
    ) -> Tuple[torch.Tensor, Trail]:
        """x (B, T, d_model) -> (y (B, T, d_model), trail of the rotated keys and values (B, H_kv, T, D))."""
        q, k, v = self.proj.split(x, io)
        position = positions(state.pos, x.shape[1], x.device)
        q, k = self.rotary(q, position), self.rotary(k, position)
        if self._verifies_in_place(state, q):
            return self.proj.merge(self._verify_in_place(q, k, v, state), io), {"k": k, "v": v}
        outputs, st = [], state
        for start, n in pieces(x.shape[1], self.window):
            part = slice(start, start + n)
            outputs.append(self._attend(q[:, :, part], k[:, :, part], v[:, :, part], st))
            if start + n < x.shape[1]:
                st = self._advance(st, k[:, :, part], v[:, :, part], n)
        return self.proj.merge(torch.cat(outputs, dim=2), io), {"k": k, "v": v}

    def state_after(self, state: SlidingWindowState, trail: Trail, kept: Counter) -> SlidingWindowState:
        for start, n in pieces(trail["k"].shape[2], self.window):
            part = slice(start, start + n)
            state = self._advance(state, trail["k"][:, :, part], trail["v"][:, :, part], kept_in_piece(kept, start, n))
        return state

    def _verifies_in_place(self, st: SlidingWindowState, q: torch.Tensor) -> bool:
        """Whether T tokens are verified as T steps of the step's kernel on a StaticDecoder's ring (T <= window),
        when HYDRALM_DECODE_VERIFY=kernels."""
        return (
            decode_verify_backend() == "kernels"
            and st.in_place
            and torch.is_tensor(st.pos)
            and q.shape[2] <= self.window
            and q.dtype in KERNEL_DTYPES
            and st.k.dtype in KERNEL_DTYPES
            and swa_decode_backend(q.is_cuda, q.shape[0]) == "triton"
        )

    def _verify_in_place(self, q, k, v, st: SlidingWindowState) -> torch.Tensor:
        """What T ``step`` calls give, with the step's kernel and so the same bits: each token written into the ring
        and attending in turn, then the T slots written back as they were. q (B, H, T, D) -> (B, H, T, D)."""
        from hydralm.kernels.attention.triton_decode import sliding_window_decode

        slots = positions(st.pos, q.shape[2], q.device) % self.window
        saved = [(ring, ring.index_select(2, slots)) for ring in (st.k, st.v)]
        outputs = []
        for j in range(q.shape[2]):
            st.k.index_copy_(2, slots[j : j + 1], k[:, :, j : j + 1].to(st.k.dtype))
            st.v.index_copy_(2, slots[j : j + 1], v[:, :, j : j + 1].to(st.v.dtype))
            outputs.append(sliding_window_decode(q[:, :, j], st.k, st.v, st.pos + j)[:, :, None])
        for ring, values in saved:
            ring.index_copy_(2, slots, values)
        return torch.cat(outputs, dim=2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, st: SlidingWindowState) -> torch.Tensor:
        """n <= window queries at positions pos .. pos + n - 1 over [ring | their own keys]: query j sees the ring
        slots whose token is within its window and the new keys up to itself. (B, H, n, D)."""
        n, device = q.shape[2], q.device
        held = ring_ids(st.pos - 1, self.window, device)  # the position each ring slot holds (< 0: none)
        lowest = positions(st.pos, n, device) - self.window + 1  # the oldest position each query sees
        in_window = (held >= 0)[None, :] & (held[None, :] >= lowest[:, None])
        mask = torch.cat([in_window, torch.ones(n, n, dtype=torch.bool, device=device).tril()], dim=-1)
        groups = self.proj.kv_groups
        keys = repeat_kv(torch.cat([st.k.to(q.dtype), k], dim=2), groups)
        values = repeat_kv(torch.cat([st.v.to(q.dtype), v.to(q.dtype)], dim=2), groups)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def _advance(self, st: SlidingWindowState, k: torch.Tensor, v: torch.Tensor, kept: Counter) -> SlidingWindowState:
        """The state after the first `kept` of n <= window new keys: their ring slots written."""
        n = k.shape[2]
        if not torch.is_tensor(kept):
            if kept == 0:
                return st
            slots = positions(st.pos, kept, k.device) % self.window
            ring_k = st.k.index_copy(2, slots, k[:, :, :kept].to(st.k.dtype))
            ring_v = st.v.index_copy(2, slots, v[:, :, :kept].to(st.v.dtype))
            return SlidingWindowState(k=ring_k, v=ring_v, pos=st.pos + kept)
        # every slot is written, the old value where the token was not kept: one shape whatever `kept` is
        slots = positions(st.pos, n, k.device) % self.window
        keep = (torch.arange(n, device=k.device) < kept).view(1, 1, n, 1)
        ring_k = st.k.index_copy(2, slots, torch.where(keep, k.to(st.k.dtype), st.k.index_select(2, slots)))
        ring_v = st.v.index_copy(2, slots, torch.where(keep, v.to(st.v.dtype), st.v.index_select(2, slots)))
        return SlidingWindowState(k=ring_k, v=ring_v, pos=st.pos + kept)


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
