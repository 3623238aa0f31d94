"""Projections shared by the softmax-attention mixers (sliding-window, retrieval, full)."""

from typing import Tuple

import torch
from torch import nn

from hydralm.config import HydraConfig, config_error
from hydralm.modules.linear import PLAIN_IO, BlockIO, Linear


def check_rotary_head_dim(cfg: HydraConfig, layer_type: str) -> None:
    """Rotary embeddings rotate pairs of channels: the head size must be even."""
    if cfg.resolved_head_dim % 2:
        raise config_error(
            "head_dim", cfg.resolved_head_dim, f"an even head size: {layer_type} layers use rotary embeddings"
        )


class AttentionProjections(nn.Module):
    """q (n_heads) and k/v (n_kv_heads) from one matmul, and the output projection."""

    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.resolved_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv_heads * self.head_dim
        self.qkv = Linear(cfg.d_model, self.q_size + 2 * self.kv_size, bias=False)
        self.out = Linear(self.q_size, cfg.d_model, bias=False)
        self.out.residual_out = True  # scaled init, see HydraLM._init_weights

    @property
    def kv_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def split(self, x: torch.Tensor, io: BlockIO = PLAIN_IO) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, d_model) -> q (B, H, N, D), k and v (B, H_kv, N, D); io.norm applied first (decode steps)."""
        B, N, _ = x.shape
        q, k, v = io.project_in(self.qkv, x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, N, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def merge(self, y: torch.Tensor, io: BlockIO = PLAIN_IO) -> torch.Tensor:
        """y (B, H, N, D) -> (B, N, d_model); plus io.residual (decode steps)."""
        B, H, N, D = y.shape
        return io.project_out(self.out, y.transpose(1, 2).reshape(B, N, H * D))
