"""StaticDecoder: ``model.step`` on buffers of fixed addresses, so that it can be compiled and graph-captured.

There is one decode path: each layer's ``step`` works on fixed-shape buffers (SWA's ring, the retrieval layer's
bank and pool rings with compressive memory, DeltaNet's state) and reads its counters through
hydralm/modules/slots.py, which takes a Python int (eager ``model.step``) or a 0-dim device tensor. The decoder
keeps one copy of the state with device counters and, per token, runs ``model.decode_step`` on it and writes
the new state back into the same tensors. A chunk completing, its compression into the pool and eviction
happen inside the step (masked writes), so every step has the same shapes and kernels: ``compile=True`` wraps
the step in ``torch.compile(fullgraph=True)``, and on CUDA ``compile_mode="reduce-overhead"`` captures it as a
CUDA graph that reads and writes the buffers in place.

Speculative decoding runs on the same buffers: ``verify`` scores T tokens in one pass (``model.decode_many``,
fixed shapes for a fixed T) without moving the state and keeps its trail in buffers of its own; ``commit(kept)``
then advances the state by the accepted prefix (``model.state_after`` with `kept` a device counter, one graph
whatever its value). ``mtp_step`` runs one MTP module on a draft. Each is compiled and captured like ``step``.
``greedy_round`` fuses a whole greedy self-draft round (drafts, verify, acceptance, commit) into one graph whose
accepted count stays on the device, so rounds follow each other without a host read.

Layers whose state grows (full attention; retrieval without ``HydraConfig.memory``) are refused: each mixer's
``state_growth()`` says why.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch

from hydralm.modules.mixer import DecodeState, DecodeTrail


class StaticDecoder:
    """decoder = StaticDecoder(model, state)   # state: from a prefill (model(..., return_state=True))
    logits = decoder.step(token_ids)           # (B,) -> (B, vocab); model.step's logits
    decoder.load(other_state)                  # same shapes: reuses the compiled step
    logits, hidden = decoder.verify(ids)       # (B, T) -> (B, T, vocab), (B, T, d); the state does not move
    decoder.commit(kept)                       # the state after the first `kept` of those T tokens

    The decoder owns copies of the state's tensors; `state` itself is left as it was."""

    def __init__(self, model, state: DecodeState, compile: bool = False, compile_mode: Optional[str] = None):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        model._check_state(state)
        self.model = model
        device = model.embed.weight.device
        self.state: DecodeState = [layer.with_device_counters(device) for layer in state]
        for layer in self.state:
            layer.in_place = True  # the decoder's own buffers: a step may update them in place (LayerState)
        self.batch_size = self.state[0].batch_size
        self.compile, self.compile_mode = compile, compile_mode
        self.kept = torch.zeros((), dtype=torch.long, device=device)  # commit's count, a device counter
        self._verify: Dict[int, "_Verifier"] = {}  # per number of tokens T
        self._verified: Optional[int] = None  # T of the verify that commit applies
        self._rounds: Dict[int, Callable] = {}  # greedy_round per number of drafts k
        self.step_fn = self._step
        self.mtp_step_fn = self._mtp_step
        if compile:
            # fixed addresses: a CUDA graph (mode="reduce-overhead") then reads and writes the buffers in place
            # instead of skipping capture because its inputs are mutated
            for layer in self.state:
                for tensor in [*layer.tensors().values(), *(getattr(layer, c) for c in layer.COUNTERS)]:
                    torch._dynamo.mark_static_address(tensor)
            torch._dynamo.mark_static_address(self.kept)
            self.step_fn = torch.compile(self._step, fullgraph=True, mode=compile_mode)
            # dynamic=False: one graph per MTP depth (an int argument), never a symbolic one
            self.mtp_step_fn = torch.compile(self._mtp_step, fullgraph=True, mode=compile_mode, dynamic=False)

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

    # -- speculative decoding ----------------------------------------------------------------------
    @torch.no_grad()
    def verify(self, token_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """T tokens per row after the state, in one pass over the weights: token_ids (B, T) -> (logits (B, T, V),
        hidden (B, T, d)), what T ``step`` calls would give (claim C1). The state does not move until
        ``commit``. The outputs are the decoder's buffers for this T, overwritten by its next verify."""
        if token_ids.dim() != 2 or token_ids.shape[0] != self.batch_size or token_ids.shape[1] == 0:
            raise ValueError(
                f"token_ids must have shape ({self.batch_size}, T >= 1), T tokens per row of the state; "
                f"got {tuple(token_ids.shape)}"
            )
        tokens = token_ids.shape[1]
        if tokens not in self._verify:
            self._verify[tokens] = _Verifier(self, token_ids)
        verifier = self._verify[tokens]
        verifier.verify_fn(token_ids)
        self._verified = tokens
        return verifier.logits, verifier.hidden

    @torch.no_grad()
    def commit(self, kept: int) -> None:
        """Advance the state by the first `kept` (1 .. T) tokens of the last ``verify``: the state after them,
        bit for bit what eager ``model.state_after`` gives; nothing of the other tokens remains."""
        if self._verified is None:
            raise ValueError("commit needs a verify first (and applies it once)")
        tokens = self._verified
        if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= tokens:
            raise ValueError(f"kept={kept!r} must be an int in [1, {tokens}], the tokens of the last verify")
        self.kept.fill_(kept)  # a fill kernel: no host-to-device copy, no synchronisation
        self._verify[tokens].commit_fn()
        self._verified = None

    @torch.no_grad()
    def mtp_step(self, depth: int, hidden: torch.Tensor, token: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` (1-based) on a draft: (h^depth (B, d), logits (B, V)), compiled with the decoder.
        Returns copies: under CUDA graphs (cudagraph trees) a graph's outputs may be reused by the next graph
        run, and depth i's output is depth i + 1's input."""
        hidden, logits = self.mtp_step_fn(depth, hidden, token)
        return hidden.clone(), logits.clone()

    def _mtp_step(self, depth: int, hidden: torch.Tensor, token: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.mtp.draft_step(depth, hidden, token, self.model.embed, self.model.lm_head)

    @torch.no_grad()
    def greedy_round(
        self, pending: torch.Tensor, hidden: torch.Tensor, k: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round of greedy MTP self-drafting at batch 1, on the device from start to end (one graph when
        compiled, no host read): draft k tokens with the MTP modules, verify [pending, drafts] in one pass, keep
        the drafts up to the first one the target's argmax disagrees with, append the target's next token and
        advance the state by them. pending (1,) the last emitted token, not yet fed; hidden (1, d) the hidden
        state that predicted it. Returns copies of (emitted (k + 1,): the kept drafts, then the next token
        repeated; count (): 1 + kept drafts; next token (1,); hidden (1, d) at the last kept token)."""
        if self.batch_size != 1 or not 1 <= k <= self.model.cfg.mtp_depth:
            raise ValueError(
                f"greedy_round drafts one row with the MTP modules: batch size 1 (got {self.batch_size}) and "
                f"1 <= k <= mtp_depth={self.model.cfg.mtp_depth} (got k={k})"
            )
        if k not in self._rounds:
            fn = self._greedy_round
            self._rounds[k] = (
                torch.compile(fn, fullgraph=True, mode=self.compile_mode, dynamic=False) if self.compile else fn
            )
        return tuple(t.clone() for t in self._rounds[k](pending, hidden, k))  # graph outputs are reused by the next run

    def _greedy_round(self, pending: torch.Tensor, hidden: torch.Tensor, k: int):
        model = self.model
        h, token, drafts = hidden, pending, []
        for depth in range(1, k + 1):
            h, logits = model.mtp.draft_step(depth, h, token, model.embed, model.lm_head)
            token = logits.argmax(-1)
            drafts.append(token)
        drafted = torch.cat(drafts)  # (k,)
        logits, trail, verified_hidden = model.decode_many(torch.cat([pending, drafted])[None], self.state)
        best = logits[0].argmax(-1)  # (k + 1,) the target's greedy token after each fed token
        n = (best[:k] == drafted).long().cumprod(0).sum()  # drafts kept: up to the first disagreement
        self.kept.copy_(n + 1)
        for buffers, new in zip(self.state, model.state_after(self.state, trail, self.kept)):
            buffers.copy_(new)
        next_token = best.gather(0, n[None])
        slots = torch.arange(k + 1, device=best.device)
        emitted = torch.where(slots < n, torch.cat([drafted, next_token]), next_token)
        return emitted, n + 1, next_token, verified_hidden[0].index_select(0, n[None])


class _Verifier:
    """A StaticDecoder's verify and commit for one number of tokens T: the trail, logits and hidden states live
    in buffers of fixed addresses, written in place by the (compiled) verify and read by the (compiled) commit."""

    def __init__(self, decoder: StaticDecoder, token_ids: torch.Tensor):
        self.decoder = decoder
        model = decoder.model
        # one eager call sizes the buffers (its values are overwritten by the first verify)
        logits, trail, hidden = model.decode_many(token_ids, decoder.state)
        self.logits, self.hidden = logits.clone(), hidden.clone()
        self.trail = DecodeTrail(trail.tokens, [{n: t.clone() for n, t in layer.items()} for layer in trail.layers])
        self.verify_fn, self.commit_fn = self._verify, self._commit
        if decoder.compile:
            for tensor in [self.logits, self.hidden, *(t for layer in self.trail.layers for t in layer.values())]:
                torch._dynamo.mark_static_address(tensor)
            mode = decoder.compile_mode
            self.verify_fn = torch.compile(self._verify, fullgraph=True, mode=mode, dynamic=False)
            self.commit_fn = torch.compile(self._commit, fullgraph=True, mode=mode, dynamic=False)

    def _verify(self, token_ids: torch.Tensor) -> None:
        logits, trail, hidden = self.decoder.model.decode_many(token_ids, self.decoder.state)
        self.logits.copy_(logits)
        self.hidden.copy_(hidden)
        for buffers, new in zip(self.trail.layers, trail.layers):
            for name, value in new.items():
                buffers[name].copy_(value)

    def _commit(self) -> None:
        decoder = self.decoder
        new_state = decoder.model.state_after(decoder.state, self.trail, decoder.kept)
        for buffers, new in zip(decoder.state, new_state):
            buffers.copy_(new)


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
