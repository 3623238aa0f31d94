"""StaticDecoder: decoding with fixed-shape state buffers, so that one step can be compiled or graph-captured.

`model.step` is exact and flexible (functional states, rollback, any layer mix) but its shapes follow
Python-int counters (tokens seen, chunks in the bank, slots in the pool), so every step re-dispatches
~6,500 PyTorch calls from Python (`python -m benchmarks.profile_decode`). Here the counters live in
0-dim device tensors and every layer reads full-capacity buffers under masks:

  DeltaNet   S (B, H, D, D) and the short-conv cache: already fixed-shape, updated in place.
  SWA        the ring (B, H_kv, window, D); the new key goes to slot pos % window (index_copy_), and a
             mask keeps the slots not yet written out of the softmax (the same set `step` slices).
  retrieval  bank, summaries, compressed pool and the chunk in progress at their capacities; routing
             scores every slot and masks the ineligible ones (pool slots >= n_pool, bank chunks >= n - 1),
             so top-k picks the same chunks as `step`; the chunk in progress is written at pos % C.

What changes shape — a completed chunk joining the bank, compression into the pool, eviction — happens
once every C tokens and runs eagerly between steps (`RetrievalAttention.complete_chunk`, the code `step`
uses), its results copied back into the same buffers. `step_fn` (the fixed-shape part) can then be wrapped
by `torch.compile` (`compile=True`); on CUDA, `compile_mode="reduce-overhead"` captures it as a CUDA graph.

Retrieval layers need the compressive memory (`HydraConfig.memory`): without it the bank grows with the
stream and has no fixed shape. Full-attention layers are not supported (their cache grows too).
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from hydralm.kernels.attention.local import repeat_kv
from hydralm.kernels.retrieval.gather import gather_chunks, sparse_chunk_attention


class StaticDecoder:
    """decoder = StaticDecoder(model, state)   # state: from a prefill (model(..., return_state=True))
    logits = decoder.step(token_ids)           # (B,) -> (B, vocab); the same logits as model.step
    decoder.load(other_state)                  # same shapes: reuses the compiled step

    The decoder owns copies of the state's tensors; `state` itself is left as it was."""

    def __init__(self, model, state: List[dict], compile: bool = False, compile_mode: Optional[str] = None):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        if len(state) != len(model.blocks):
            raise ValueError(f"state must have one entry per layer ({len(model.blocks)}), got {len(state)}")
        self.model = model
        self.pos = _position(state)
        device = model.embed.weight.device
        self.pos_t = torch.tensor(self.pos, device=device)
        self.buffers = [_as_buffers(block.layer_type, s, device) for block, s in zip(model.blocks, state)]
        # the layers whose chunks complete between steps, with their buffers
        self._retrieval = [
            (block.mixer, buffers)
            for block, buffers in zip(model.blocks, self.buffers)
            if block.layer_type == "retrieval"
        ]
        self.batch_size = next(t.shape[0] for b in self.buffers for t in b.values() if torch.is_tensor(t))
        self.step_fn = self._step
        if compile:
            # fixed addresses: a CUDA graph (mode="reduce-overhead") then reads and writes the buffers in place
            # instead of skipping capture because its inputs are mutated
            for tensor in [self.pos_t, *(t for b in self.buffers for t in b.values() if torch.is_tensor(t))]:
                torch._dynamo.mark_static_address(tensor)
            self.step_fn = torch.compile(self._step, fullgraph=True, mode=compile_mode)

    @torch.no_grad()
    def load(self, state: List[dict]) -> None:
        """Continue from another state with the same shapes (another prompt, a later point of a stream),
        reusing the compiled step: its tensors are copied into the buffers."""
        if len(state) != len(self.buffers):
            raise ValueError(f"state must have one entry per layer ({len(self.buffers)}), got {len(state)}")
        for i, (st, buffers) in enumerate(zip(state, self.buffers)):
            for key, value in st.items():
                if torch.is_tensor(value):
                    if value.shape != buffers[key].shape:
                        raise ValueError(
                            f"state[{i}][{key!r}] has shape {tuple(value.shape)}, the decoder's buffer "
                            f"{tuple(buffers[key].shape)}: build a new StaticDecoder for it"
                        )
                    buffers[key].copy_(value)  # straight into the buffer: no intermediate clone
            if "counts" in buffers:
                _set_counts(buffers, {key: int(st[key]) for key in buffers["counts"]})
        self.pos = _position(state)
        self.pos_t.fill_(self.pos)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One token per row: token_ids (B,) -> next-token logits (B, vocab). Under a CUDA graph the logits
        live in the graph's output buffer, which the next step overwrites: clone them to keep them."""
        if tuple(token_ids.shape) != (self.batch_size,):
            raise ValueError(
                f"token_ids must have shape ({self.batch_size},), one token per row of the state; "
                f"got {tuple(token_ids.shape)}"
            )
        logits = self.step_fn(token_ids)
        for mixer, buffers in self._retrieval:
            if self.pos % mixer.chunk_size == mixer.chunk_size - 1:
                _complete_chunk(mixer, buffers)
        self.pos += 1
        self.pos_t.add_(1)  # on the device: no host-to-device copy, no sync
        return logits

    def _step(self, token_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.embed(token_ids)
        for block, buffers in zip(m.blocks, self.buffers):
            x = x + _STEPS[block.layer_type](block.mixer, block.mixer_norm(x), buffers, self.pos_t)
            x = x + block.mlp(block.mlp_norm(x))
        return m.lm_head(m.norm(x))


def unsupported(model) -> Optional[str]:
    """Why StaticDecoder cannot decode `model`, or None when it can."""
    others = sorted({t for t in model.cfg.layer_types if t not in _STEPS})
    if others:
        return (
            f"StaticDecoder supports deltanet, swa and retrieval layers; this model has {others} "
            "(their caches grow with the stream)"
        )
    if "retrieval" in model.cfg.layer_types and model.cfg.memory is None:
        return (
            "StaticDecoder needs HydraConfig.memory for retrieval layers: without the compressive memory their "
            "banks grow with the stream and have no fixed shape"
        )
    return None


def _position(state: List[dict]) -> int:
    """Tokens the state has seen (SWA and retrieval layers count them; a DeltaNet-only state needs no count)."""
    return next((int(s["pos"]) for s in state if "pos" in s), 0)


def _as_buffers(layer_type: str, st: dict, device) -> dict:
    # full-capacity copies (clone_state would cut banks to their used prefix)
    buffers = {key: value.clone() for key, value in st.items() if torch.is_tensor(value)}
    if layer_type == "retrieval":  # host counters stay ints for the eager chunk completion; their mirrors are tensors
        buffers["counts"] = {key: int(st[key]) for key in ("n_chunks", "n_pool", "compressed", "evicted")}
        buffers["n_t"] = torch.tensor(st["n_chunks"], device=device)
        buffers["n_pool_t"] = torch.tensor(st["n_pool"], device=device)
    return buffers


def _set_counts(b: dict, counts: dict) -> None:
    """A retrieval layer's host counters and their device mirrors, together."""
    b["counts"].update(counts)
    b["n_t"].fill_(counts["n_chunks"])
    b["n_pool_t"].fill_(counts["n_pool"])


def _deltanet_step(mixer, x: torch.Tensor, b: dict, pos: torch.Tensor) -> torch.Tensor:
    y, new = mixer.step(x, {"S": b["S"], "conv": b["conv"]})
    b["S"].copy_(new["S"])
    b["conv"].copy_(new["conv"])
    return y


def _swa_step(mixer, x: torch.Tensor, b: dict, pos: torch.Tensor) -> torch.Tensor:
    ring_k, ring_v = b["k"], b["v"]
    window = ring_k.shape[2]
    q, k, v = mixer.proj.split(x[:, None])
    q, k = mixer.rotary(q, pos.view(1)), mixer.rotary(k, pos.view(1))
    slot = (pos % window).view(1)
    ring_k.index_copy_(2, slot, k.to(ring_k.dtype))
    ring_v.index_copy_(2, slot, v.to(ring_v.dtype))
    written = (torch.arange(window, device=x.device) <= pos).view(1, 1, 1, window)  # all once the ring wrapped
    groups = mixer.proj.kv_groups
    y = F.scaled_dot_product_attention(
        q, repeat_kv(ring_k.to(q.dtype), groups), repeat_kv(ring_v.to(q.dtype), groups), attn_mask=written
    )
    return mixer.proj.merge(y)[:, 0]


def _retrieval_step(mixer, x: torch.Tensor, b: dict, pos: torch.Tensor) -> torch.Tensor:
    C, groups, top_k = mixer.chunk_size, mixer.proj.kv_groups, mixer.top_k
    n, n_pool = b["n_t"], b["n_pool_t"]
    q, k, v = mixer.proj.split(x[:, None])  # (B, H, 1, D), (B, H_kv, 1, D)
    filled = pos % C
    b["buf_k"].index_copy_(2, filled.view(1), k.to(b["buf_k"].dtype))
    b["buf_v"].index_copy_(2, filled.view(1), v.to(b["buf_v"].dtype))
    B, H, _, D = q.shape
    P, capacity = b["pool_summaries"].shape[2], b["summaries"].shape[2]
    # Routing over [pool | bank] at full capacity; ineligible slots masked (as route_tokens' n_eligible does).
    rows = q.float().reshape(B, H // groups, groups, 1, D)
    scores = torch.cat(
        [rows @ s.float().transpose(-1, -2)[:, :, None] for s in (b["pool_summaries"], b["summaries"])], dim=-1
    ).reshape(B, H, 1, P + capacity)
    slots = torch.arange(P + capacity, device=x.device)
    eligible = torch.where(slots < P, slots < n_pool, slots - P < n - 1)
    top, selected = scores.masked_fill(~eligible, float("-inf")).topk(min(top_k, P + capacity), dim=-1)
    valid = torch.isfinite(top)  # (B, H, 1, k)
    exact_k = gather_chunks(b["bank_k"], selected[:, :, 0], offset=P)  # (B, H, k, C, D); pool ids clamped, masked
    exact_v = gather_chunks(b["bank_v"], selected[:, :, 0], offset=P)
    reads = valid & (selected >= P)
    Cr = b["pool_k"].shape[3]
    pool_k = gather_chunks(b["pool_k"], selected[:, :, 0]).flatten(-3, -2)  # (B, H, k * Cr, D)
    pool_v = gather_chunks(b["pool_v"], selected[:, :, 0]).flatten(-3, -2)
    pool_reads = (valid & (selected < P)).repeat_interleave(Cr, dim=-1)
    previous = (n - 1).clamp(min=0).view(1)  # the last completed chunk: local context, masked while n == 0
    prev_k = b["bank_k"].index_select(2, previous)[:, :, 0]
    prev_v = b["bank_v"].index_select(2, previous)[:, :, 0]
    local_k = repeat_kv(torch.cat([prev_k, b["buf_k"]], dim=2), groups)
    local_v = repeat_kv(torch.cat([prev_v, b["buf_v"]], dim=2), groups)
    in_chunk = torch.arange(C, device=x.device)
    local_mask = torch.cat([(n > 0).expand(C), in_chunk <= filled]).view(1, 1, 1, 2 * C).expand(B, H, 1, 2 * C)
    y = sparse_chunk_attention(
        q,
        exact_k,
        exact_v,
        reads,
        torch.cat([pool_k, local_k], dim=-2),
        torch.cat([pool_v, local_v], dim=-2),
        torch.cat([pool_reads, local_mask], dim=-1),
    )
    return mixer.proj.merge(y)[:, 0]


def _complete_chunk(mixer, b: dict) -> None:
    """Between steps, once a chunk is full: the eager completion `step` uses, copied back into the buffers."""
    counts = b["counts"]
    tensors = {key: value for key, value in b.items() if torch.is_tensor(value) and key not in ("n_t", "n_pool_t")}
    new = mixer.complete_chunk({**tensors, **counts})
    for key, value in tensors.items():
        if value is not new[key]:
            value.copy_(new[key])
    _set_counts(b, {key: int(new[key]) for key in counts})


_STEPS = {"deltanet": _deltanet_step, "swa": _swa_step, "retrieval": _retrieval_step}
