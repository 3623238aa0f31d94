"""StaticDecoder: ``model.step`` on buffers of fixed addresses, so that it can be compiled and graph-captured.

There is one decode path: each layer's ``step`` works on fixed-shape buffers (SWA's ring, the retrieval layer's
bank and pool rings with compressive memory, DeltaNet's state) and reads its counters through
hydralm/modules/slots.py, which takes a Python int (eager ``model.step``) or a 0-dim device tensor. The decoder
keeps one copy of the state with device counters and, per token, runs ``model.decode_step`` on it and writes
the new state back into the same tensors. A chunk completing, its compression into the pool and eviction
happen inside the step (masked writes), so every step has the same shapes and kernels: ``compile=True`` wraps
the step in ``torch.compile(fullgraph=True)``, and on CUDA ``compile_mode="reduce-overhead"`` captures it as a
CUDA graph that reads and writes the buffers in place.

Layers whose state grows (full attention; retrieval without ``HydraConfig.memory``) are refused: each mixer's
``state_growth()`` says why.
"""

from typing import Dict, List, Optional

import torch

from hydralm.modules.mixer import DecodeState


class StaticDecoder:
    """decoder = StaticDecoder(model, state)   # state: from a prefill (model(..., return_state=True))
    logits = decoder.step(token_ids)           # (B,) -> (B, vocab); model.step's logits
    decoder.load(other_state)                  # same shapes: reuses the compiled step

    The decoder owns copies of the state's tensors; `state` itself is left as it was."""

    def __init__(self, model, state: DecodeState, compile: bool = False, compile_mode: Optional[str] = None):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        model._check_state(state)
        self.model = model
        device = model.embed.weight.device
        self.state: DecodeState = [layer.with_device_counters(device) for layer in state]
        self.batch_size = self.state[0].batch_size
        self.step_fn = self._step
        if compile:
            # fixed addresses: a CUDA graph (mode="reduce-overhead") then reads and writes the buffers in place
            # instead of skipping capture because its inputs are mutated
            for layer in self.state:
                for tensor in [*layer.tensors().values(), *(getattr(layer, c) for c in layer.COUNTERS)]:
                    torch._dynamo.mark_static_address(tensor)
            self.step_fn = torch.compile(self._step, fullgraph=True, mode=compile_mode)

    @property
    def pos(self) -> int:
        """Tokens the decoder's state has seen (read back from the device)."""
        return next((int(layer.pos) for layer in self.state if hasattr(layer, "pos")), 0)

    @torch.no_grad()
    def load(self, state: DecodeState) -> None:
        """Continue from another state with the same shapes (another prompt, a later point of a stream),
        reusing the compiled step: its tensors are copied into the buffers."""
        self.model._check_state(state, self.batch_size)
        for i, (mine, other) in enumerate(zip(self.state, state)):
            for name, value in other.tensors().items():
                if value.shape != getattr(mine, name).shape:
                    raise ValueError(
                        f"state[{i}].{name} has shape {tuple(value.shape)}, the decoder's buffer "
                        f"{tuple(getattr(mine, name).shape)}: build a new StaticDecoder for it"
                    )
            mine.copy_(other)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One token per row: token_ids (B,) -> next-token logits (B, vocab). Under a CUDA graph the logits
        live in the graph's output buffer, which the next step overwrites: clone them to keep them."""
        if tuple(token_ids.shape) != (self.batch_size,):
            raise ValueError(
                f"token_ids must have shape ({self.batch_size},), one token per row of the state; "
                f"got {tuple(token_ids.shape)}"
            )
        # any integer dtype, as model.step takes; the id range is checked on the CPU only (no host read on a GPU)
        return self.step_fn(self.model._checked_ids(token_ids, check_range=not token_ids.is_cuda))

    def _step(self, token_ids: torch.Tensor) -> torch.Tensor:
        logits, new_state, _ = self.model.decode_step(token_ids, self.state)
        for buffers, new in zip(self.state, new_state):
            buffers.copy_(new)  # in place: the addresses a compiled / captured step reads stay fixed
        return logits


def unsupported(model) -> Optional[str]:
    """Why StaticDecoder cannot decode `model`, or None when it can."""
    reasons: Dict[str, List[str]] = {}
    for block in model.blocks:
        reason = block.mixer.state_growth()
        if reason is not None:
            reasons.setdefault(reason, []).append(block.layer_type)
    if not reasons:
        return None
    return "StaticDecoder needs decode states of fixed shape: " + "; ".join(
        f"{sorted(set(types))} layers: {reason}" for reason, types in reasons.items()
    )
