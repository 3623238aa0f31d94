"""Autoregressive generation: one parallel prefill, then one decode step per new token: ``model.step``, or a
``StaticDecoder`` (eager, or compiled / CUDA-graph-captured), chosen by ``generate(decoder=...)``.

Memory does not grow with the number of generated tokens beyond the model's own decode state (DeltaNet
and SWA states are constant; a retrieval bank grows by one chunk every C tokens) and the output token ids:
nothing re-reads the prefix. See docs/inference.md.
"""

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from hydralm.model import HydraLM
from hydralm.modules.mixer import DecodeState
from hydralm.state import select_rows
from hydralm.static_decode import StaticDecoder, unsupported
from hydralm.token_sampling import check_sampling, sample_next

# Prompt tokens fed to one parallel forward during prefill; bounds prefill activations and the
# (tokens, vocab) logits tensor the forward returns.
PREFILL_CHUNK_SIZE = 8192

# decoder="auto" compiles a CUDA graph for at least this many new tokens, or when the model already holds a
# compiled graph decoder: the first generate with "graph" took 28 s on an H200 (compile and capture), and a
# graph step saves ~28 ms per token over model.step (1.2 vs 27-33 ms), so one call breaks even near 1,000 tokens
# (docs/inference.md).
GRAPH_MIN_NEW_TOKENS = 1024
DECODERS = ("auto", "step", "static", "graph")

PromptLike = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[torch.Tensor]]


@contextlib.contextmanager
def inference_mode(*models: Optional[nn.Module]) -> Iterator[None]:
    """eval() and no_grad() for the block; every model's training flag is restored afterwards."""
    present = [m for m in models if m is not None]
    flags = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(present, flags):
            m.train(flag)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prefill(
    model: HydraLM,
    input_ids: torch.Tensor,
    state: Optional[DecodeState] = None,
    chunk_size: Optional[int] = PREFILL_CHUNK_SIZE,
) -> Tuple[torch.Tensor, torch.Tensor, DecodeState]:
    """Feed input_ids (B, N >= 1) through the parallel forward, `chunk_size` tokens per call, carrying the
    state. Returns (logits (B, V) and hidden (B, d) at the last token, new state)."""
    if input_ids.shape[1] == 0:
        raise ValueError("prefill needs at least one token")
    step = input_ids.shape[1] if chunk_size is None else chunk_size
    for piece in input_ids.split(step, dim=1):
        out = model(piece, state=state, return_state=True, return_hidden=True, logits_to_keep=1)
        state = out["state"]
        # clone: keep the last hidden row only, not the whole (B, piece, d) tensor
        logits, hidden = out["logits"][:, -1], out["hidden"][:, -1].clone()
    assert state is not None  # at least one piece
    return logits, hidden, state


def decode(
    model: HydraLM,
    state: Optional[DecodeState],
    logits: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    drop_finished: bool = True,
    feed_last: bool = False,
    decoder: Optional[StaticDecoder] = None,
) -> Tuple[torch.Tensor, Optional[DecodeState], torch.Tensor]:
    """The decode loop from a prefilled state whose next-token logits (B, V) are given.

    Returns (new tokens (B, T), state, logits (B, V)). T = max_new_tokens, or fewer when every row has
    emitted eos_token_id; a row that finished is filled with pad_token_id (default: eos) from then on.
    drop_finished: finished rows leave the batch (less work; the returned state is then meaningless).
    feed_last: also step the last token, so the returned state and logits continue after all T tokens.
    Rows that stay in the batch after finishing (drop_finished=False, or a decoder) are fed eos, an id the
    model emitted, in place of their padding (pad_token_id may be any int, e.g. -1), so every row of the
    state stays at the same position.
    decoder: a StaticDecoder loaded with `state` steps instead of model.step. Its batch is fixed, so rows
    never leave it; the state lives in the decoder and None is returned for it.
    """
    B, device = logits.shape[0], logits.device
    pad = eos_token_id if pad_token_id is None else pad_token_id
    pad = 0 if pad is None else pad
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    active = torch.arange(B, device=device)  # rows still in the batch
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    drop_finished = drop_finished and decoder is None  # a static decoder's batch size is fixed
    T = 0
    for t in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(finished[active], torch.full_like(token, pad), token)
            finished[active] |= token == eos_token_id
        out[active, t] = token
        T = t + 1
        all_done = eos_token_id is not None and bool(finished.all())
        if (t == max_new_tokens - 1 or all_done) and not feed_last:
            break
        if drop_finished and eos_token_id is not None and bool(finished[active].any()):
            keep = (~finished[active]).nonzero()[:, 0]
            assert state is not None, "dropping finished rows needs the state"
            active, token, state = active[keep], token[keep], select_rows(state, keep)
        if eos_token_id is not None:  # finished rows still in the batch are fed eos, never their padding
            token = token.masked_fill(finished[active], eos_token_id)
        if decoder is None:
            logits, state = model.step(token, state)
        else:  # logits may be the CUDA graph's output buffer: sampled above, before this step overwrites it
            logits = decoder.step(token)
        if all_done:
            break
    if decoder is not None:
        return out[:, :T], None, logits.clone()  # a copy the decoder's next step cannot overwrite
    return out[:, :T], state, logits


def check_integer(ids: torch.Tensor) -> None:
    """Token ids must be integers: a float tensor would be truncated silently by the cast to int64."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be an integer tensor, got dtype {ids.dtype}")


def _as_rows(
    prompt_ids: PromptLike, prompt_lengths: Optional[Union[torch.Tensor, Sequence[int]]], device: torch.device
) -> Tuple[List[torch.Tensor], bool, bool]:
    """Prompt rows as 1-D int64 tensors on device, plus (was the input 1-D, is the batch ragged)."""
    if torch.is_tensor(prompt_ids):
        check_integer(prompt_ids)
        if prompt_ids.dim() == 1:
            if prompt_lengths is not None:
                raise ValueError("prompt_lengths needs a 2-D (batch, max_len) prompt_ids tensor")
            return [prompt_ids.to(device=device, dtype=torch.long)], True, False
        if prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0:
            raise ValueError(f"prompt_ids must be 1-D or (batch >= 1, seq_len), got shape {tuple(prompt_ids.shape)}")
        ids = prompt_ids.to(device=device, dtype=torch.long)
        if prompt_lengths is None:
            return list(ids), False, False
        lengths = [int(n) for n in torch.as_tensor(prompt_lengths).tolist()]
        if len(lengths) != ids.shape[0] or any(not 1 <= n <= ids.shape[1] for n in lengths):
            raise ValueError(f"prompt_lengths must give one length in [1, {ids.shape[1]}] per row, got {lengths}")
        return [row[:n] for row, n in zip(ids, lengths)], False, True
    if prompt_lengths is not None:
        raise ValueError("prompt_lengths is only for a padded (batch, max_len) tensor; a list is already ragged")
    for r in prompt_ids:
        if torch.is_tensor(r):
            check_integer(r)
    rows = [torch.as_tensor(r, dtype=torch.long, device=device).reshape(-1) for r in prompt_ids]
    if not rows:
        raise ValueError("prompt_ids is empty")
    return rows, False, True


def generate(
    model: HydraLM,
    prompt_ids: PromptLike,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    prompt_lengths: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    pad_token_id: Optional[int] = None,
    prefill_chunk_size: Optional[int] = PREFILL_CHUNK_SIZE,
    decoder: str = "auto",
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Sample up to max_new_tokens after each prompt.

    prompt_ids: (B, L) tensor -> (B, L + T) tensor; T = max_new_tokens, or less when every row has
    emitted eos_token_id (finished rows are padded with pad_token_id, default eos). A 1-D prompt gives a
    1-D result. Ragged prompts, either a list of 1-D sequences or a right-padded (B, L_max) tensor with
    prompt_lengths, give a list of 1-D tensors: row i is its prompt followed by its new tokens, which
    end at its first eos (inclusive) or after max_new_tokens.

    temperature <= 0 is greedy; top_k / top_p filter the distribution (hydralm.token_sampling). A
    torch.Generator makes sampling reproducible. The model runs in eval mode under no_grad; its
    training flag is restored afterwards.

    decoder: what runs each new token after the prefill. "step": model.step. "static": a StaticDecoder
    (fixed-shape buffers; finished rows stay in the batch, fed eos). "graph": the StaticDecoder compiled,
    as a CUDA graph on a GPU (compile_mode="reduce-overhead"). "auto": "graph" on a GPU for a model the
    StaticDecoder supports when max_new_tokens >= GRAPH_MIN_NEW_TOKENS or the model already holds a compiled
    graph decoder, else "step". Static decoders are
    cached on the model (one per batch size and kind), so later calls reuse the compiled graph.
    """
    check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    device = model_device(model)
    decoder = _pick_decoder(model, decoder, max_new_tokens, device)
    rows, one_d, ragged = _as_rows(prompt_ids, prompt_lengths, device)
    if any(r.numel() == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (the model has no empty-context state)")
    sampling: Dict[str, Any] = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        generator=generator,
    )
    with inference_mode(model):
        # Rows share one stream position in a state, so only prompts of equal length decode together:
        # each length group is prefilled and decoded as one batch (exactly what one-by-one would compute).
        groups: Dict[int, List[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.numel(), []).append(i)
        new_tokens: List[Optional[torch.Tensor]] = [None] * len(rows)
        for members in groups.values():
            prompts = torch.stack([rows[i] for i in members])
            if max_new_tokens == 0:
                tokens = prompts.new_zeros(len(members), 0)
            else:
                logits, _, state = prefill(model, prompts, chunk_size=prefill_chunk_size)
                static = None
                if decoder != "step" and max_new_tokens > 1:  # one new token needs no step, nor a compile
                    static = _static_decoder(model, state, decoder, len(members))
                tokens, _, _ = decode(model, state, logits, max_new_tokens, **sampling, decoder=static)
            for j, i in enumerate(members):
                new_tokens[i] = tokens[j]
    done = [t for t in new_tokens if t is not None]  # every row has its tokens by now
    if ragged:
        return [torch.cat([r, _trim_after_eos(t, eos_token_id)]) for r, t in zip(rows, done)]
    T = max(t.numel() for t in done)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    out = torch.cat([torch.stack(rows), _pad_to(torch.stack([_pad_to(t, T, pad) for t in done]), T, pad)], 1)
    return out[0] if one_d else out


def _pick_decoder(model: HydraLM, decoder: str, max_new_tokens: int, device: torch.device) -> str:
    """generate's `decoder` argument resolved to "step", "static" or "graph"."""
    if not isinstance(decoder, str) or decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    reason = unsupported(model)
    if decoder == "auto":
        compiled = any(key[1] == "graph" for key in getattr(model, "_static_decoders", {}))
        graph_pays = device.type == "cuda" and (compiled or max_new_tokens >= GRAPH_MIN_NEW_TOKENS)
        return "graph" if graph_pays and reason is None and max_new_tokens > 1 else "step"
    if decoder != "step" and reason is not None:
        raise ValueError(f"decoder={decoder!r}: {reason}")
    return decoder


class _DecoderCache(dict):
    """(batch size, kind, device, dtype) -> StaticDecoder, kept on the model as a plain attribute (not in
    state_dict). A copied or pickled model starts empty: a compiled step stays bound to its own buffers."""

    def __deepcopy__(self, memo):
        return _DecoderCache()

    def __reduce__(self):
        return _DecoderCache, ()


def _static_decoder(model: HydraLM, state: DecodeState, kind: str, batch_size: int) -> StaticDecoder:
    """The model's cached StaticDecoder for this batch size and kind, holding `state`; built on first use."""
    cache = getattr(model, "_static_decoders", None)
    if cache is None:
        cache = _DecoderCache()
        model._static_decoders = cache  # type: ignore[assignment]  # plain attribute: not a submodule, not in state_dict
    weight = model.embed.weight
    key = (batch_size, kind, weight.device, weight.dtype)
    if key in cache:
        cache[key].load(state)  # copies into the captured buffers: the compiled step is reused
    else:
        mode = "reduce-overhead" if kind == "graph" and weight.is_cuda else None  # reduce-overhead: a CUDA graph
        cache[key] = StaticDecoder(model, state, compile=kind == "graph", compile_mode=mode)
    return cache[key]


def _trim_after_eos(tokens: torch.Tensor, eos_token_id: Optional[int]) -> torch.Tensor:
    if eos_token_id is None:
        return tokens
    hits = (tokens == eos_token_id).nonzero()
    return tokens if hits.numel() == 0 else tokens[: int(hits[0, 0]) + 1]


def _pad_to(tokens: torch.Tensor, length: int, pad: Optional[int]) -> torch.Tensor:
    missing = length - tokens.shape[-1]
    if missing <= 0:
        return tokens
    filler = torch.full(
        (*tokens.shape[:-1], missing), 0 if pad is None else pad, dtype=tokens.dtype, device=tokens.device
    )
    return torch.cat([tokens, filler], dim=-1)
