"""Full causal attention with a growing KV cache: the mixer of the dense Transformer baseline."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.attention.local import causal_attention, repeat_kv
from hydralm.modules.attention import AttentionProjections, check_rotary_head_dim
from hydralm.modules.linear import PLAIN_IO, BlockIO
from hydralm.modules.mixer import Counter, LayerState, Trail
from hydralm.modules.rotary import Rotary


@dataclass
class FullAttentionState(LayerState):
    k: torch.Tensor  # (B, H_kv, pos, D) every rotated key so far
    v: torch.Tensor  # (B, H_kv, pos, D)

    @property
    def pos(self) -> int:
        """Tokens seen: the cache length."""
        return self.k.shape[2]


class FullAttention(nn.Module):
    """State: FullAttentionState(k, v (B, H_kv, pos, D)): every rotated key / value; memory grows with N."""

    state_class = FullAttentionState

    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.proj = AttentionProjections(cfg)
        self.rotary = Rotary(cfg.resolved_head_dim, cfg.rope_base)

    @staticmethod
    def check_config(cfg: HydraConfig) -> None:
        check_rotary_head_dim(cfg, "attention")

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> FullAttentionState:
        shape = (batch_size, self.proj.n_kv_heads, 0, self.proj.head_dim)
        return FullAttentionState(
            k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype)
        )

    def state_growth(self) -> Optional[str]:
        return "they keep every key and value (their cache grows with the stream)"

    def forward(
        self, x: torch.Tensor, state: Optional[FullAttentionState] = None, io: BlockIO = PLAIN_IO
    ) -> Tuple[torch.Tensor, FullAttentionState]:
        B, N, _ = x.shape
        pos0 = 0 if state is None else state.pos
        q, k, v = self.proj.split(x, io)
        positions = torch.arange(pos0, pos0 + N, device=x.device)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        if state is not None and pos0 > 0:
            k = torch.cat([state.k.to(k.dtype), k], dim=2)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
        groups = self.proj.kv_groups
        y = causal_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), q_offset=pos0)
        return self.proj.merge(y, io), FullAttentionState(k=k, v=v)

    def step(
        self, x_t: torch.Tensor, state: FullAttentionState, io: BlockIO = PLAIN_IO
    ) -> Tuple[torch.Tensor, FullAttentionState]:
        y, state = self.forward(x_t[:, None], state, io)
        return y[:, 0], state

    def step_many(
        self, x: torch.Tensor, state: FullAttentionState, io: BlockIO = PLAIN_IO
    ) -> Tuple[torch.Tensor, Trail]:
        """x (B, T, d_model): the parallel forward from the cache; the trail holds the T new keys and values."""
        y, new = self.forward(x, state, io)
        return y, {"k": new.k[:, :, state.pos :], "v": new.v[:, :, state.pos :]}

    def state_after(self, state: FullAttentionState, trail: Trail, kept: Counter) -> FullAttentionState:
        kept = int(kept)  # the cache grows: its length is a host number
        return FullAttentionState(
            k=torch.cat([state.k, trail["k"][:, :, :kept].to(state.k.dtype)], dim=2),
            v=torch.cat([state.v, trail["v"][:, :, :kept].to(state.v.dtype)], dim=2),
        )
