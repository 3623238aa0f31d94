"""Gated DeltaNet mixer (Yang et al., "Gated Delta Networks"; the recipe fla uses).

q, k, v = SiLU(short_conv(W x)); q, k L2-normalised; per-head log-decay g = -exp(A_log) * softplus(a + dt_bias)
and write strength beta = sigmoid(b); the gated delta rule (kernels/delta_rule/) with an fp32 state;
output RMSNorm gated by SiLU(gate(x)), then the output projection.

State: DeltaNetState(S (B, H, D, D) fp32 delta-rule state, conv (B, kernel - 1, 3 H D) short-conv cache); both
keep one shape while decoding.
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.delta_rule import chunk_gated_delta_rule, delta_rule_step
from hydralm.modules.mixer import LayerState
from hydralm.modules.rmsnorm import GatedRMSNorm, RMSNorm
from hydralm.modules.short_conv import ShortConv


@dataclass
class DeltaNetState(LayerState):
    S: torch.Tensor  # (B, H, D, D) delta-rule state, fp32 at least
    conv: torch.Tensor  # (B, kernel - 1, 3 H D) the short conv's last inputs

    FP32_FIELDS: ClassVar[Tuple[str, ...]] = ("S",)


class GatedDeltaNet(nn.Module):
    state_class = DeltaNetState

    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.resolved_head_dim
        self.chunk_size, self.norm_qk = cfg.dn_chunk_size, cfg.dn_norm_qk
        inner = self.n_heads * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.conv = ShortConv(3 * inner, cfg.dn_short_conv_kernel)
        self.a_proj = nn.Linear(cfg.d_model, self.n_heads, bias=False)  # decay input
        self.b_proj = nn.Linear(cfg.d_model, self.n_heads, bias=False)  # write strength input
        # Mamba-style decay parameters, kept out of weight decay by the optimizer (ndim 1).
        self.A_log = nn.Parameter(torch.empty(self.n_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(self.n_heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus of dt
        self.gate = nn.Linear(cfg.d_model, inner, bias=False) if cfg.dn_use_gate else None
        self.out_norm = (
            GatedRMSNorm(self.head_dim, cfg.rms_eps) if cfg.dn_use_gate else RMSNorm(self.head_dim, cfg.rms_eps)
        )
        self.out = nn.Linear(inner, cfg.d_model, bias=False)
        self.out.residual_out = True  # scaled init, see HydraLM._init_weights

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> DeltaNetState:
        inner = self.n_heads * self.head_dim
        return DeltaNetState(
            S=torch.zeros(
                batch_size,
                self.n_heads,
                self.head_dim,
                self.head_dim,
                device=device,
                dtype=torch.promote_types(dtype, torch.float32),
            ),
            conv=torch.zeros(batch_size, self.conv.kernel_size - 1, 3 * inner, device=device, dtype=dtype),
        )

    def state_growth(self) -> Optional[str]:
        return None  # S and the conv cache keep their shapes

    def _gates(self, x: torch.Tensor):
        """Log-decay g and write strength beta, in fp32: (..., H)."""
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x).float())
        return g, beta

    def _split_heads(self, qkv: torch.Tensor):
        q, k, v = qkv.unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(-3)
        if self.norm_qk:
            q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        return q, k, v

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o (..., H, D) in x's dtype -> (..., d_model)."""
        if self.gate is not None:
            o = self.out_norm(o, self.gate(x).unflatten(-1, (self.n_heads, self.head_dim)))
        else:
            o = self.out_norm(o)
        return self.out(o.flatten(-2))

    def forward(self, x: torch.Tensor, state: Optional[DeltaNetState] = None) -> Tuple[torch.Tensor, DeltaNetState]:
        qkv, conv_cache = self.conv(self.qkv(x), None if state is None else state.conv)
        q, k, v = self._split_heads(qkv)  # (B, N, H, D)
        g, beta = self._gates(x)  # (B, N, H)
        initial = None if state is None else state.S
        o, S = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial, chunk_size=self.chunk_size)
        return self._output(o.to(x.dtype), x), DeltaNetState(S=S, conv=conv_cache)

    def step(self, x_t: torch.Tensor, state: DeltaNetState) -> Tuple[torch.Tensor, DeltaNetState]:
        """x_t (B, d_model) -> (B, d_model); O(1) in the sequence length."""
        qkv, conv_cache = self.conv.step(self.qkv(x_t), state.conv)
        q, k, v = self._split_heads(qkv)  # (B, H, D)
        g, beta = self._gates(x_t)
        o, S = delta_rule_step(q, k, v, g, beta, state.S)
        return self._output(o.to(x_t.dtype), x_t), DeltaNetState(S=S, conv=conv_cache)
