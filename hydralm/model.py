"""HydraLM: a pre-norm residual stack of interchangeable mixers, scheduled by HydraConfig.layer_types.

    x = embed(ids);  per block: x = x + mixer(norm(x));  x = x + swiglu(norm(x))
    logits = lm_head(norm(x))          (lm_head tied to the embedding by default)

Training asks for the loss without the logits (``labels=..., return_logits=False``): the head and the
cross-entropy then run over chunks of rows (kernels/cross_entropy/), never materialising (B, N, V).

Every mixer follows one contract (hydralm/modules/mixer.py): ``forward(x, state) -> (y, state)`` and
``step(x_t, state) -> (y_t, state)`` on a typed per-layer state, so the model runs a parallel forward, chunked
prefill with carried state, and O(1)-per-token decoding with the same weights and the same answers (claim C1).
Mixer classes come from the registry (hydralm/modules/registry.py).
"""

import math
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hydralm.config import HydraConfig
from hydralm.kernels.cross_entropy import linear_cross_entropy
from hydralm.modules.linear import BlockIO
from hydralm.modules.mixer import Counter, DecodeState, DecodeTrail, LayerState, Mixer, Trail
from hydralm.modules.mtp_head import MTPHead, mtp_linear_loss
from hydralm.modules.multi_token import check_kept
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

    def forward(
        self, x: torch.Tensor, state: Optional[LayerState] = None, checkpoint_mlp: bool = False
    ) -> Tuple[torch.Tensor, LayerState]:
        y, state = self.mixer(self.mixer_norm(x), state)
        x = x + y
        if checkpoint_mlp:  # keep only x: the norm and the MLP run again in backward (activation_checkpointing=mlp)
            return x + checkpoint(self._mlp, x, use_reentrant=False), state
        return x + self._mlp(x), state

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp_norm(x))

    # Decode steps hand each sublayer its norm and residual (BlockIO), which the projections may fold in.
    def step(self, x_t: torch.Tensor, state: LayerState) -> Tuple[torch.Tensor, LayerState]:
        x_t, state = self.mixer.step(x_t, state, BlockIO(self.mixer_norm, residual=x_t))
        return self.mlp.step(x_t, BlockIO(self.mlp_norm, residual=x_t)), state

    def step_many(self, x: torch.Tensor, state: LayerState) -> Tuple[torch.Tensor, Trail]:
        x, trail = self.mixer.step_many(x, state, BlockIO(self.mixer_norm, residual=x))
        return self.mlp.step(x, BlockIO(self.mlp_norm, residual=x)), trail


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
        # Recompute blocks' activations in backward (set by the trainer: a memory / speed trade-off, not part of
        # the architecture, so it stays out of HydraConfig and exported configs): True = every block, a fraction
        # f in [0, 1] = floor(f * n_layers) blocks spread evenly over the depth.
        self.activation_checkpointing: Union[bool, float, str] = False  # str: "mlp"
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
        return_logits: bool = True,
        logits_at: Optional[torch.Tensor] = None,
        check_id_range: bool = True,
    ) -> Dict[str, Any]:
        """input_ids (B, N). Returns {"logits" (B, N, V), "state" (per-layer list, if return_state),
        "loss" (mean next-token CE, if labels), "logits_at" ((B, Q, V), if logits_at), "mtp_logits" (list of
        (B, N - k, V), if compute_mtp and return_logits), "mtp_aux_loss" (scaled, if compute_mtp),
        "memory_aux_loss" (the compressive memory's weighted reconstruction loss, training forwards only),
        "hidden" (B, N, d) last hidden state before the final norm, if return_hidden}.

        ``labels`` (B, N), aligned with the logits (-100 = no loss; 0 when every position is -100), give "loss"
        and the MTP loss its targets; by default the MTP modules learn the input's own future tokens.
        ``return_logits=False`` skips the (B, N, V) logits: the losses then run through the chunked linear +
        cross-entropy (kernels/cross_entropy/), which never holds the whole batch's logits (the training path).
        ``logits_at`` (B, Q) positions computes the logits of those rows only (answer accuracy in training).
        ``logits_to_keep=k`` computes logits for the last k positions only (prefill and streaming need one
        row, not (B, N, V)). ``check_id_range=False`` skips the check that every id is below vocab_size, which
        on a GPU reads two numbers back (a host-device sync), for callers that checked the ids already
        (StreamingEngine checks each input once, not each piece).
        """
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be (batch >= 1, seq_len >= 1), got shape {tuple(input_ids.shape)}")
        input_ids = self._checked_ids(input_ids, check_range=check_id_range)
        self._check_state(state, input_ids.shape[0])
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"labels must have input_ids' shape {tuple(input_ids.shape)} (labels[:, t] is the token after t, "
                f"-100 = no loss), got shape {tuple(labels.shape)}"
            )
        if logits_to_keep is not None and not 1 <= logits_to_keep <= input_ids.shape[1]:
            raise ValueError(f"logits_to_keep={logits_to_keep!r} must be in [1, seq_len={input_ids.shape[1]}]")
        if logits_at is not None and (logits_at.dim() != 2 or logits_at.shape[0] != input_ids.shape[0]):
            raise ValueError(f"logits_at must be (batch={input_ids.shape[0]}, Q), got shape {tuple(logits_at.shape)}")
        self._clear_memory_losses()
        x = self.embed(input_ids)
        new_state = []
        for i, block in enumerate(self._blocks()):
            x, layer_state = self._run_block(i, block, x, None if state is None else state[i])
            new_state.append(layer_state)
        out: Dict[str, Any] = {
            "logits": None,
            "state": new_state if return_state else None,
            "loss": None,
            "logits_at": None,
            "mtp_logits": None,
            "mtp_aux_loss": None,
            "memory_aux_loss": self._memory_loss(),
        }
        if return_logits:
            head_input = x if logits_to_keep is None else x[:, x.shape[1] - logits_to_keep :]
            out["logits"] = self.lm_head(self.norm(head_input))
        if labels is not None:
            if out["logits"] is not None and logits_to_keep is None:  # the logits exist: CE from them is cheap
                total = F.cross_entropy(out["logits"].flatten(0, 1).float(), labels.flatten(), reduction="sum")
                out["loss"] = total / (labels != -100).sum().clamp(min=1)
            else:
                out["loss"] = linear_cross_entropy(self.norm(x), self.lm_head.weight, labels)
        if logits_at is not None:
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            out["logits_at"] = self.lm_head(self.norm(x[rows, logits_at]))
        if return_hidden:
            out["hidden"] = x
        if compute_mtp:
            if self.mtp is None:
                raise ValueError("compute_mtp=True needs HydraConfig.mtp_depth > 0 (it is 0)")
            if labels is None:
                labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)
            head_inputs = self.mtp.head_inputs(x, input_ids, self.embed)
            if return_logits:
                out["mtp_logits"] = [self._head(features) for features in head_inputs]
            out["mtp_aux_loss"] = self.cfg.mtp_loss_weight * mtp_linear_loss(head_inputs, self.lm_head.weight, labels)
        return out

    @property
    def blocks_compiled(self) -> bool:
        return all(getattr(block, "_compiled_call_impl", None) is not None for block in self.blocks)

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """torch.compile each block's forward in place (regional compile: parameter names and the state dict stay
        as they are; blocks of one type share their compiled code). The delta rule op runs outside the compiled
        graphs (torch.compiler.disable in kernels/delta_rule/): its Triton kernels are launched as they are."""
        for block in self._blocks():
            block.compile(**compile_kwargs)

    def _run_block(
        self, i: int, block: Block, x: torch.Tensor, layer_state: Optional[LayerState]
    ) -> Tuple[torch.Tensor, LayerState]:
        """Block i; when ``activation_checkpointing`` covers it in a training forward, its activations are
        recomputed in backward instead of kept (torch.utils.checkpoint, non-reentrant); "mlp": only those of the
        MLP sublayer, in every block."""
        if self.activation_checkpointing == "mlp":
            return block(x, layer_state, checkpoint_mlp=self.training and torch.is_grad_enabled())
        f = float(self.activation_checkpointing)
        if f > 0 and int((i + 1) * f) > int(i * f) and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, layer_state, use_reentrant=False)
        return block(x, layer_state)

    def step(self, input_ids_t: torch.Tensor, state: Optional[DecodeState] = None) -> Tuple[torch.Tensor, DecodeState]:
        """Decode one token per row: input_ids_t (B,) or (B, 1) -> (logits (B, V), new state)."""
        logits, state, _ = self.step_hidden(input_ids_t, state)
        return logits, state

    def step_hidden(
        self, input_ids_t: torch.Tensor, state: Optional[DecodeState] = None
    ) -> Tuple[torch.Tensor, DecodeState, torch.Tensor]:
        """Like ``step`` but also returns the last hidden state (B, d) that the MTP head drafts from."""
        shape = tuple(input_ids_t.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] == 0:
            raise ValueError(
                f"step takes one token per row: input_ids_t of shape (batch,) or (batch, 1) with batch >= 1, "
                f"got shape {shape}" + (" (a 0-d tensor: pass ids.view(1) for one row)" if not shape else "")
            )
        input_ids_t = input_ids_t.reshape(shape[0])
        # On a GPU the id range is checked by forward (the prompt), not per decoded token: reading min/max back
        # would synchronise host and device every step. CPU steps check it.
        input_ids_t = self._checked_ids(input_ids_t, check_range=not input_ids_t.is_cuda)
        if state is None:
            state = self.init_state(input_ids_t.shape[0], input_ids_t.device)
        self._check_state(state, input_ids_t.shape[0])
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
        return self._decode_head(x), new_state, x

    def step_many(
        self, input_ids: torch.Tensor, state: Optional[DecodeState] = None
    ) -> Tuple[torch.Tensor, DecodeTrail, torch.Tensor]:
        """T tokens per row after `state` in one pass over the weights: input_ids (B, T) -> (logits (B, T, V),
        trail, hidden (B, T, d)), equal to T ``step`` calls (claim C1). `state` is left as it was;
        ``state_after(state, trail, kept)`` is the state after the first `kept` tokens (speculative decoding
        verifies drafts this way and keeps the accepted prefix)."""
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"step_many takes (batch >= 1, tokens >= 1) ids, got shape {tuple(input_ids.shape)}")
        input_ids = self._checked_ids(input_ids, check_range=not input_ids.is_cuda)
        if state is None:
            state = self.init_state(input_ids.shape[0], input_ids.device)
        self._check_state(state, input_ids.shape[0])
        return self.decode_many(input_ids, state)

    def decode_many(
        self, input_ids: torch.Tensor, state: DecodeState
    ) -> Tuple[torch.Tensor, DecodeTrail, torch.Tensor]:
        """``step_many`` without its input checks: what a StaticDecoder compiles and captures to verify drafts.
        Every layer takes the T tokens against its decode state (the buffers ``step`` uses, fixed shapes)."""
        x = self.embed(input_ids)
        trails = []
        for block, layer_state in zip(self._blocks(), state):
            x, trail = block.step_many(x, layer_state)
            trails.append(trail)
        return self._decode_head(x), DecodeTrail(input_ids.shape[1], trails), x

    def state_after(self, state: DecodeState, trail: DecodeTrail, kept: Counter) -> DecodeState:
        """The state after the first `kept` (1 .. T) tokens of the ``step_many`` / ``decode_many`` call that left
        `trail` from `state`: an int, or a 0-dim device tensor inside a compiled step (same shapes for every
        value). Nothing of the other tokens remains in it."""
        check_kept(kept, trail.tokens)
        return [
            block.mixer.state_after(layer_state, layer_trail, kept)
            for block, layer_state, layer_trail in zip(self._blocks(), state, trail.layers)
        ]

    def _clear_memory_losses(self) -> None:
        """Drop a reconstruction loss no forward of this model will read: the one an activation-checkpointed
        block's recomputation in backward set."""
        if self.cfg.memory is not None:
            for block in self._blocks():
                if getattr(block.mixer, "memory_loss", None) is not None:
                    block.mixer.memory_loss = None  # type: ignore[attr-defined]  # only retrieval layers have it

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

    def _decode_head(self, x: torch.Tensor) -> torch.Tensor:
        """lm_head(norm(x)) in decode steps: one GEMV with the final norm folded in where the decode projections
        fold theirs (HYDRALM_DECODE_LINEAR=fused, hydralm/modules/linear.py), else the two modules."""
        return BlockIO(self.norm).project_in(self.lm_head, x)

    def _blocks(self) -> Iterator[Block]:
        """The residual blocks, typed (iterating an nn.ModuleList yields plain Modules)."""
        return cast(Iterator[Block], iter(self.blocks))

    # -- input checks ----------------------------------------------------------------------------
    def _state_shapes(self) -> List[Dict[str, Tuple[int, ...]]]:
        """Per layer, the shape of each state tensor without its batch dim (0: a dim that grows with the stream),
        read once from an empty state on the meta device (nothing allocated)."""
        shapes = getattr(self, "_state_shapes_cache", None)
        if shapes is None:
            shapes = [
                {name: tuple(t.shape[1:]) for name, t in block.mixer.init_state(1, device="meta").tensors().items()}
                for block in self._blocks()
            ]
            self._state_shapes_cache = shapes
        return shapes

    def _checked_ids(self, ids: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Token ids of any integer dtype, checked, as the embedding takes them (int64 unless int32)."""
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
        if check_range and ids.numel():
            low, high = torch.stack([ids.min(), ids.max()]).tolist()  # one read back from a GPU, not two
            if low < 0 or high >= self.cfg.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, vocab_size={self.cfg.vocab_size}); got values in [{low}, {high}]"
                )
        return ids if ids.dtype in (torch.int64, torch.int32) else ids.long()

    def _check_state(self, state: Optional[DecodeState], batch_size: Optional[int] = None) -> None:
        """A state made by this model (one entry of each layer's state type) for a batch of batch_size rows."""
        if state is None:
            return
        if not isinstance(state, (list, tuple)) or len(state) != len(self.blocks):
            length = len(state) if isinstance(state, (list, tuple)) else type(state).__name__
            raise ValueError(f"state must have one entry per layer ({len(self.blocks)}), got {length}")
        for i, (block, layer_state) in enumerate(zip(self._blocks(), state)):
            expected = block.mixer.state_class
            if type(layer_state) is not expected:
                raise ValueError(
                    f"state[{i}] is a {type(layer_state).__name__}, but layer {i} is {block.layer_type!r} and "
                    f"takes a {expected.__name__}: a state belongs to the model (layer types) that made it"
                )
            for name, tensor in layer_state.tensors().items():
                held = self._state_shapes()[i][name]
                if tensor.dim() != len(held) + 1 or any(e and n != e for n, e in zip(tensor.shape[1:], held)):
                    shape = ", ".join(["batch"] + [str(e) if e else "any" for e in held])
                    raise ValueError(
                        f"state[{i}].{name} has shape {tuple(tensor.shape)}, but layer {i} ({block.layer_type!r}) "
                        f"of this model holds ({shape}): a state belongs to the model (layer sizes) that made it"
                    )
            if batch_size is not None and layer_state.batch_size != batch_size:
                raise ValueError(
                    f"state[{i}] holds {layer_state.batch_size} rows but the input has {batch_size}: a state "
                    f"belongs to the batch that made it (select_rows / stack_states change its rows)"
                )
