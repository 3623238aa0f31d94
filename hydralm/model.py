"""HydraLM: a pre-norm residual stack of interchangeable mixers, scheduled by HydraConfig.layer_types.

    x = embed(ids);  per block: x = x + mixer(norm(x));  x = x + swiglu(norm(x))
    logits = lm_head(norm(x))          (lm_head tied to the embedding by default)

Every mixer follows one contract (hydralm/modules/mixer.py): ``forward(x, state) -> (y, state)`` and
``step(x_t, state) -> (y_t, state)`` on a typed per-layer state, so the model runs a parallel forward, chunked
prefill with carried state, and O(1)-per-token decoding with the same weights and the same answers (claim C1).
Mixer classes come from the registry (hydralm/modules/registry.py).
"""

import math
from typing import Any, Dict, Iterator, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig
from hydralm.modules.mixer import DecodeState, LayerState, Mixer
from hydralm.modules.mtp_head import MTPHead, mtp_loss
from hydralm.modules.registry import mixer_class
from hydralm.modules.rmsnorm import RMSNorm
from hydralm.modules.swiglu import SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: HydraConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mixer: Mixer = mixer_class(layer_type)(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, state: Optional[LayerState] = None) -> Tuple[torch.Tensor, LayerState]:
        y, state = self.mixer(self.mixer_norm(x), state)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state

    def step(self, x_t: torch.Tensor, state: LayerState) -> Tuple[torch.Tensor, LayerState]:
        y, state = self.mixer.step(self.mixer_norm(x_t), state)
        x_t = x_t + y
        return x_t + self.mlp(self.mlp_norm(x_t)), state


class HydraLM(nn.Module):
    def __init__(self, cfg: HydraConfig):
        super().__init__()
        if not isinstance(cfg, HydraConfig):
            raise TypeError(f"HydraLM expects a HydraConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, t) for t in cfg.types)
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.mtp = MTPHead(cfg.d_model, cfg.mtp_depth, cfg.rms_eps) if cfg.mtp_depth > 0 else None
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        """Normal(0, initializer_range) for embeddings and projections; projections that write into the
        residual stream get std / sqrt(2 n_layers) (GPT-2), so the residual variance stays O(1) with depth.
        DeltaNet decay parameters (A_log, dt_bias) and norms keep their own inits."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "residual_out", False) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    # -- API -------------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embeddings else total

    def init_state(self, batch_size: int, device: Optional[torch.device] = None) -> DecodeState:
        """An empty decode state: one typed entry per layer (the mixer's ``state_class``)."""
        device = device if device is not None else self.embed.weight.device
        dtype = self.embed.weight.dtype
        return [block.mixer.init_state(batch_size, device=device, dtype=dtype) for block in self._blocks()]

    def forward(
        self,
        input_ids: torch.Tensor,
        state: Optional[DecodeState] = None,
        return_state: bool = False,
        compute_mtp: bool = False,
        labels: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
        logits_to_keep: Optional[int] = None,
    ) -> Dict[str, Any]:
        """input_ids (B, N). Returns {"logits" (B, N, V), "state" (per-layer list, if return_state),
        "mtp_logits" (list of (B, N - k, V), if compute_mtp), "mtp_aux_loss" (scaled, if compute_mtp),
        "memory_aux_loss" (the compressive memory's weighted reconstruction loss, training forwards only),
        "hidden" (B, N, d) last hidden state before the final norm, if return_hidden}.

        ``labels`` (B, N), aligned with the logits (-100 = no loss), gives the MTP loss its targets; by
        default the MTP modules learn the input's own future tokens. ``logits_to_keep=k`` computes logits for
        the last k positions only (prefill and streaming need one row, not (B, N, V)).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, seq_len >= 1), got shape {tuple(input_ids.shape)}")
        self._check_ids(input_ids)
        self._check_state(state)
        if logits_to_keep is not None and not 1 <= logits_to_keep <= input_ids.shape[1]:
            raise ValueError(f"logits_to_keep={logits_to_keep!r} must be in [1, seq_len={input_ids.shape[1]}]")
        x = self.embed(input_ids)
        new_state = []
        for i, block in enumerate(self._blocks()):
            x, layer_state = block(x, None if state is None else state[i])
            new_state.append(layer_state)
        head_input = x if logits_to_keep is None else x[:, x.shape[1] - logits_to_keep :]
        out = {
            "logits": self.lm_head(self.norm(head_input)),
            "state": new_state if return_state else None,
            "mtp_logits": None,
            "mtp_aux_loss": None,
            "memory_aux_loss": self._memory_loss(),
        }
        if return_hidden:
            out["hidden"] = x
        if compute_mtp:
            if self.mtp is None:
                raise ValueError("compute_mtp=True needs HydraConfig.mtp_depth > 0 (it is 0)")
            if labels is None:
                labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)
            out["mtp_logits"] = self.mtp(x, input_ids, self.embed, self._head)
            out["mtp_aux_loss"] = self.cfg.mtp_loss_weight * mtp_loss(out["mtp_logits"], labels)
        return out

    def step(self, input_ids_t: torch.Tensor, state: Optional[DecodeState] = None) -> Tuple[torch.Tensor, DecodeState]:
        """Decode one token per row: input_ids_t (B,) or (B, 1) -> (logits (B, V), new state)."""
        logits, state, _ = self.step_hidden(input_ids_t, state)
        return logits, state

    def step_hidden(
        self, input_ids_t: torch.Tensor, state: Optional[DecodeState] = None
    ) -> Tuple[torch.Tensor, DecodeState, torch.Tensor]:
        """Like ``step`` but also returns the last hidden state (B, d) that the MTP head drafts from."""
        if input_ids_t.dim() == 2:
            if input_ids_t.shape[1] != 1:
                raise ValueError(f"step takes one token per row, got shape {tuple(input_ids_t.shape)}")
            input_ids_t = input_ids_t[:, 0]
        # On a GPU the id range is checked by forward (the prompt), not per decoded token: reading min/max back
        # would synchronise host and device every step. CPU steps check it.
        self._check_ids(input_ids_t, check_range=not input_ids_t.is_cuda)
        if state is None:
            state = self.init_state(input_ids_t.shape[0], input_ids_t.device)
        self._check_state(state)
        return self.decode_step(input_ids_t, state)

    def decode_step(
        self, input_ids_t: torch.Tensor, state: DecodeState
    ) -> Tuple[torch.Tensor, DecodeState, torch.Tensor]:
        """``step_hidden`` without its input checks: the code a StaticDecoder compiles and captures (no host
        reads). input_ids_t (B,) -> (logits (B, V), new state, hidden (B, d))."""
        x = self.embed(input_ids_t)
        new_state = []
        for block, layer_state in zip(self._blocks(), state):
            x, layer_state = block.step(x, layer_state)
            new_state.append(layer_state)
        return self.lm_head(self.norm(x)), new_state, x

    def _memory_loss(self) -> Optional[torch.Tensor]:
        """The compressors' attention-reconstruction loss from this training forward (weighted), or None."""
        if self.cfg.memory is None or not self.training:
            return None
        losses = []
        for block in self._blocks():
            loss = getattr(block.mixer, "memory_loss", None)
            if loss is not None:
                losses.append(loss)
                block.mixer.memory_loss = None  # type: ignore[attr-defined]  # only retrieval layers have it
        return self.cfg.memory["loss_weight"] * torch.stack(losses).mean() if losses else None

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def _blocks(self) -> Iterator[Block]:
        """The residual blocks, typed (iterating an nn.ModuleList yields plain Modules)."""
        return cast(Iterator[Block], iter(self.blocks))

    # -- input checks ----------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor, check_range: bool = True) -> None:
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
        if check_range and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, vocab_size={self.cfg.vocab_size}); got values in "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )

    def _check_state(self, state: Optional[DecodeState]) -> None:
        if state is None:
            return
        if len(state) != len(self.blocks):
            raise ValueError(f"state must have one entry per layer ({len(self.blocks)}), got {len(state)}")
        for i, (block, layer_state) in enumerate(zip(self._blocks(), state)):
            expected = block.mixer.state_class
            if type(layer_state) is not expected:
                raise ValueError(
                    f"state[{i}] is a {type(layer_state).__name__}, but layer {i} is {block.layer_type!r} and "
                    f"takes a {expected.__name__}: a state belongs to the model (layer types) that made it"
                )
