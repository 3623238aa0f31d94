"""Gated DeltaNet mixer (Yang et al., "Gated Delta Networks"; the recipe fla uses).

One input projection gives q, k, v, the decay input a, the write-strength input b and the output gate; then
q, k, v = SiLU(short_conv(.)); q, k L2-normalised; per-head log-decay g = -exp(A_log) * softplus(a + dt_bias)
and write strength beta = sigmoid(b), fp32 at (B, T, H) only; the gated delta rule (kernels/delta_rule/) with an
fp32 state; output RMSNorm gated by SiLU(gate), then the output projection. q, k, v and the output stay in the
projection's dtype (bf16 under autocast): no fp32 copies of (B, T, H, D) tensors outside the kernels.

On CUDA with fla importable (HYDRALM_GDN_MODULES, kernels/backend.py), the short conv, L2 norm and gated
RMSNorm run as fla's Triton kernels (kernels/fla_modules.py) on the same parameters.

State: DeltaNetState(S (B, H, D, D) fp32 delta-rule state, conv (B, kernel - 1, 3 H D) short-conv cache); both
keep one shape while decoding.

Checkpoints from before the fused projection (separate ``qkv``, ``a_proj``, ``b_proj``, ``gate`` weights)
load: ``_load_from_state_dict`` stacks them into ``in_proj``.
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.backend import (
    decode_backend,
    decode_many_backend,
    deltanet_packed,
    gdn_modules_backend,
    short_conv_backend,
)
from hydralm.kernels.delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_packed, delta_rule_step
from hydralm.kernels.fla_modules import fla_gated_rms_norm, fla_l2norm
from hydralm.modules.linear import PLAIN_IO, BlockIO, Linear
from hydralm.modules.mixer import Counter, LayerState, Trail
from hydralm.modules.rmsnorm import GatedRMSNorm, RMSNorm
from hydralm.modules.short_conv import ShortConv
from hydralm.modules.slots import read_slot

# The rows of in_proj, in order, as they were named when each was its own nn.Linear.
LEGACY_PROJECTIONS = ("qkv", "a_proj", "b_proj", "gate")
L2_EPS = 1e-6


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
        self.chunk_size, self.norm_qk, self.use_gate = cfg.dn_chunk_size, cfg.dn_norm_qk, cfg.dn_use_gate
        inner = self.n_heads * self.head_dim
        # q k v | a (decay input) | b (write strength input) | output gate: one matmul, split after.
        self.split_sizes = [3 * inner, self.n_heads, self.n_heads] + ([inner] if self.use_gate else [])
        self.in_proj = Linear(cfg.d_model, sum(self.split_sizes), bias=False)
        self.conv = ShortConv(3 * inner, cfg.dn_short_conv_kernel)
        # Mamba-style decay parameters, kept out of weight decay by the optimizer (ndim 1).
        self.A_log = nn.Parameter(torch.empty(self.n_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(self.n_heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus of dt
        self.out_norm = (
            GatedRMSNorm(self.head_dim, cfg.rms_eps) if self.use_gate else RMSNorm(self.head_dim, cfg.rms_eps)
        )
        self.out = Linear(inner, cfg.d_model, bias=False)
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

    def _project(self, x: torch.Tensor, io: BlockIO = PLAIN_IO):
        """(qkv, a, b, gate or None): views of one matmul's output (of io.norm(x) in decode steps)."""
        parts = io.project_in(self.in_proj, x).split(self.split_sizes, dim=-1)
        return parts[0], parts[1], parts[2], (parts[3] if self.use_gate else None)

    def _gates(self, a: torch.Tensor, b: torch.Tensor):
        """Log-decay g and write strength beta, in fp32: (..., H)."""
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        return g, torch.sigmoid(b.float())

    def _split_heads(self, qkv: torch.Tensor, fla: bool):
        q, k, v = qkv.unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(-3)
        if self.norm_qk:
            if fla:
                q, k = fla_l2norm(q, L2_EPS), fla_l2norm(k, L2_EPS)
            else:
                q, k = F.normalize(q, dim=-1, eps=L2_EPS), F.normalize(k, dim=-1, eps=L2_EPS)
        return q, k, v

    def _output(self, o: torch.Tensor, gate: Optional[torch.Tensor], fla: bool, io: BlockIO = PLAIN_IO) -> torch.Tensor:
        """o (..., H, D) -> (..., d_model) (plus io.residual in decode steps)."""
        if gate is None:
            o = self.out_norm(o)
        else:
            gate = gate.unflatten(-1, (self.n_heads, self.head_dim))
            if fla:
                o = fla_gated_rms_norm(o, gate, self.out_norm.weight, self.out_norm.eps)
            else:
                o = self.out_norm(o, gate)
        return io.project_out(self.out, o.flatten(-2))

    def forward(self, x: torch.Tensor, state: Optional[DeltaNetState] = None) -> Tuple[torch.Tensor, DeltaNetState]:
        fla = gdn_modules_backend(x.is_cuda) == "fla"
        qkv, a, b, gate = self._project(x)
        conv_kernel = short_conv_backend(x.is_cuda)
        qkv, conv_cache = self.conv(qkv, None if state is None else state.conv, kernel=conv_kernel)
        g, beta = self._gates(a, b)  # (B, N, H)
        initial = None if state is None else state.S
        if deltanet_packed(x.is_cuda):  # q, k, v as the conv wrote them, raw: the delta rule normalises q and k
            packed = qkv.unflatten(-1, (3, self.n_heads, self.head_dim))  # (B, N, 3, H, D)
            eps = L2_EPS if self.norm_qk else None
            o, S = chunk_gated_delta_rule_packed(packed, g, beta, initial, self.chunk_size, qk_l2norm_eps=eps)
        else:
            q, k, v = self._split_heads(qkv, fla)  # (B, N, H, D)
            o, S = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial, chunk_size=self.chunk_size)
        return self._output(o, gate, fla), DeltaNetState(S=S, conv=conv_cache)

    def step(
        self, x_t: torch.Tensor, state: DeltaNetState, io: BlockIO = PLAIN_IO
    ) -> Tuple[torch.Tensor, DeltaNetState]:
        """x_t (B, d_model) -> (B, d_model); O(1) in the sequence length."""
        if state.S.dtype == torch.float32 and decode_backend(x_t.is_cuda) == "fused":
            return self._step_fused(x_t, state, io)
        qkv, a, b, gate = self._project(x_t, io)
        qkv, conv_cache = self.conv.step(qkv, state.conv)
        q, k, v = self._split_heads(qkv, fla=False)  # (B, H, D)
        g, beta = self._gates(a, b)
        o, S = delta_rule_step(q, k, v, g, beta, state.S)
        return self._output(o.to(x_t.dtype), gate, fla=False, io=io), DeltaNetState(S=S, conv=conv_cache)

    def _step_fused(self, x_t: torch.Tensor, state: DeltaNetState, io: BlockIO) -> Tuple[torch.Tensor, DeltaNetState]:
        """``step`` with everything between the two projections in one Triton kernel (HYDRALM_DECODE=fused); on a
        StaticDecoder's buffers (``state.in_place``) the kernel writes the new S and conv cache over the old ones."""
        proj = io.project_in(self.in_proj, x_t)
        if state.in_place and state.conv.dtype == proj.dtype:
            from hydralm.kernels.delta_rule.triton_decode import gated_deltanet_step_fused_

            o = gated_deltanet_step_fused_(proj, state.conv, *self._fused_args(state.S, x_t.dtype))
            return io.project_out(self.out, o), DeltaNetState(S=state.S, conv=state.conv)
        o, S, conv = self._fused_kernel(proj, state.conv, state.S, x_t.dtype)
        return io.project_out(self.out, o), DeltaNetState(S=S, conv=conv)

    def _fused_kernel(self, proj_t: torch.Tensor, cache: torch.Tensor, S: torch.Tensor, dtype: torch.dtype):
        """One token's input projection output -> (o for the output projection, new S, new conv cache)."""
        from hydralm.kernels.delta_rule.triton_decode import gated_deltanet_step_fused

        return gated_deltanet_step_fused(proj_t, cache, *self._fused_args(S, dtype))

    def _fused_args(self, S: torch.Tensor, dtype: torch.dtype) -> tuple:
        """The fused step kernel's arguments after (proj, cache)."""
        return (self.conv.weight, self.A_log, self.dt_bias, S, self.out_norm.weight, self.n_heads, self.head_dim,
                self.out_norm.eps, self.norm_qk, self.use_gate, dtype)  # fmt: skip

    def step_many(self, x: torch.Tensor, state: DeltaNetState, io: BlockIO = PLAIN_IO) -> Tuple[torch.Tensor, Trail]:
        """x (B, T, d_model) -> (y (B, T, d_model), trail): T steps with one pass over the projections. The
        delta rule still runs token by token (a (B, H, D, D) update each); the trail keeps S after every token
        (T copies of a state that is small next to the weights) and the short conv's inputs, so any prefix's
        state is a read, not a recomputation."""
        backend = decode_many_backend(x.is_cuda)
        if state.S.dtype == torch.float32 and backend in ("fused", "looped"):
            return self._step_many_fused(x, state, io, looped=backend == "looped")
        qkv, a, b, gate = self._project(x, io)
        qkv, conv_inputs = self.conv.step_many(qkv, state.conv)
        q, k, v = self._split_heads(qkv, fla=False)  # (B, T, H, D)
        g, beta = self._gates(a, b)
        S, outputs, states = state.S, [], []
        for t in range(x.shape[1]):
            o, S = delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
            outputs.append(o)
            states.append(S)
        y = self._output(torch.stack(outputs, dim=1).to(x.dtype), gate, fla=False, io=io)
        return y, {"S": torch.stack(states, dim=1), "conv": conv_inputs}

    def _step_many_fused(
        self, x: torch.Tensor, state: DeltaNetState, io: BlockIO, looped: bool
    ) -> Tuple[torch.Tensor, Trail]:
        """``step_many`` with each token's conv, gates, delta rule and gated norm in the fused step kernel
        (HYDRALM_DECODE_MANY=fused): one launch per token and layer after one input projection; =looped: one
        launch for the T tokens, which writes the trail's states itself."""
        proj = io.project_in(self.in_proj, x)  # (B, T, 3 H D + 2 H [+ H D])
        if looped:
            from hydralm.kernels.delta_rule.triton_decode import gated_deltanet_steps_fused

            o, states = gated_deltanet_steps_fused(proj, state.conv, *self._fused_args(state.S, x.dtype))
        else:
            S, cache, outputs, per_token = state.S, state.conv, [], []
            for t in range(x.shape[1]):
                o_t, S, cache = self._fused_kernel(proj[:, t], cache, S, x.dtype)
                outputs.append(o_t)
                per_token.append(S)
            o, states = torch.stack(outputs, dim=1), torch.stack(per_token, dim=1)
        qkv = proj[..., : 3 * self.n_heads * self.head_dim]
        conv_inputs = torch.cat([state.conv.to(qkv.dtype), qkv], dim=1)  # as ShortConv.step_many keeps them
        return io.project_out(self.out, o), {"S": states, "conv": conv_inputs}

    def state_after(self, state: DeltaNetState, trail: Trail, kept: Counter) -> DeltaNetState:
        S = read_slot(trail["S"], 1, kept - 1)
        return DeltaNetState(
            S=S if torch.is_tensor(kept) else S.clone(), conv=self.conv.cache_after(trail["conv"], kept)
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Old checkpoints hold the input projections as separate weights: stack them into ``in_proj``."""
        names = [f"{prefix}{name}.weight" for name in LEGACY_PROJECTIONS[: len(self.split_sizes)]]
        if f"{prefix}in_proj.weight" not in state_dict and all(name in state_dict for name in names):
            state_dict[f"{prefix}in_proj.weight"] = torch.cat([state_dict.pop(name) for name in names], dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
