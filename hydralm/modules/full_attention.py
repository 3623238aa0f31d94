"""Full causal attention with a growing KV cache: the mixer of the dense Transformer baseline."""

from typing import Optional

import torch
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.attention.local import causal_attention, repeat_kv
from hydralm.modules.attention import AttentionProjections
from hydralm.modules.rotary import Rotary


class FullAttention(nn.Module):
    """State: {"k", "v": (B, H_kv, pos, D) every rotated key / value so far, "pos"}; memory grows with N."""

    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.proj = AttentionProjections(cfg)
        self.rotary = Rotary(cfg.resolved_head_dim, cfg.rope_base)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        shape = (batch_size, self.proj.n_kv_heads, 0, self.proj.head_dim)
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
            k = torch.cat([state["k"].to(k.dtype), k], dim=2)
            v = torch.cat([state["v"].to(v.dtype), v], dim=2)
        groups = self.proj.kv_groups
        y = causal_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), q_offset=pos0)
        return self.proj.merge(y), {"k": k, "v": v, "pos": pos0 + N}

    def step(self, x_t: torch.Tensor, state: dict):
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state
