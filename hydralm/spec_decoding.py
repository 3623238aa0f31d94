"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for HydraLM.

One round, with the target state covering every emitted token except the last one (``pending``):
  1. the drafter proposes d_1..d_k with distributions q_1..q_k: either the target's own MTP head
     (self-draft, k <= mtp_depth) or a second, smaller HydraLM with its own state;
  2. one multi-token decode step of the target over [pending, d_1..d_k] (``HydraLM.decode_many``: one pass over
     the weights, fixed shapes), from the kept state, gives the target distributions p_0..p_k (p_{i-1} is the
     distribution of the token d_i stands for);
  3. d_i is accepted with probability min(1, p_{i-1}(d_i) / q_i(d_i)); at the first rejection the round
     emits a token from normalize(max(0, p_{i-1} - q_i)); when all k are accepted it emits a bonus token
     from p_k. Every emitted token is then distributed exactly as under plain sampling from the target;
  4. the new state: ``HydraLM.state_after`` builds the state after [pending, accepted drafts] from the
     untouched pre-round state and the verify step's trail (the recurrent state after each token, the new keys
     and values), so no trace of a rejected token can remain in any layer (DeltaNet S, conv caches, SWA ring,
     retrieval bank and pool) and no second pass over the weights is needed. See docs/inference.md.

With ``decoder="graph"`` on CUDA the verify step, the commit of the accepted prefix and the MTP draft steps run
as CUDA graphs on a StaticDecoder's buffers (hydralm/static_decode.py).

Greedy (temperature <= 0) accepts d_i iff it is the argmax of p_{i-1} and emits the argmax at the first
mismatch, so it produces greedy ``generate``'s tokens. Batch size 1.
"""

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from hydralm.generation import (
    PREFILL_CHUNK_SIZE,
    _pick_decoder,
    _static_decoder,
    check_integer,
    inference_mode,
    model_device,
    prefill,
)
from hydralm.model import HydraLM
from hydralm.modules.mixer import DecodeState, DecodeTrail
from hydralm.static_decode import StaticDecoder
from hydralm.token_sampling import check_sampling, filtered_probs, sample_from_probs, sample_next


@dataclass
class SpeculativeStats:
    """Counts of one ``speculative_generate`` call. A round is one verification forward of the target."""

    k: int = 0  # drafts per round asked for (after capping at the MTP depth for self-draft)
    new_tokens: int = 0  # tokens generated (the first one comes from the prefill, not from a round)
    rounds: int = 0
    proposed: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens accepted
    target_forwards: int = 0  # target passes over the weights after prefill: one verify step per round
    draft_calls: int = 0  # draft-model forwards/steps, or MTP module calls for self-draft
    elapsed_seconds: float = 0.0
    proposed_by_depth: List[int] = field(default_factory=list)  # [i]: rounds that verified an (i+1)-th draft
    accepted_by_depth: List[int] = field(default_factory=list)  # [i]: rounds that accepted it (and all before it)

    def count_round(self, usable: int, accepted: int) -> None:
        """One verification round: `usable` drafts could be accepted, the first `accepted` of them were."""
        self.rounds += 1
        self.target_forwards += 1
        self.proposed += usable
        self.accepted += accepted
        for depth in range(usable):
            self.proposed_by_depth[depth] += 1
            self.accepted_by_depth[depth] += int(depth < accepted)

    def acceptance_by_depth(self) -> List[float]:
        """Per draft position: accepted / verified (the (i+1)-th draft is accepted only with all before it)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_by_depth, self.proposed_by_depth)]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verification forward (accepted drafts + the corrected or bonus token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_round": self.tokens_per_round,
            "acceptance_by_depth": self.acceptance_by_depth(),
        }


class RoundResult(NamedTuple):
    n_accepted: int
    next_token: torch.Tensor  # (1,): the corrected or bonus token, not yet fed to the target
    state: DecodeState  # target state after [pending, accepted drafts]
    hidden: torch.Tensor  # (1, d) target hidden state at the last fed token (what the MTP head drafts from)


class StateVerifier:
    """Verification on a state value: ``HydraLM.decode_many``, then ``state_after``. The eager counterpart of
    ``StaticDecoder.verify`` / ``commit`` (same interface), for models and devices that run no graph."""

    def __init__(self, model: HydraLM, state: DecodeState):
        self.model, self.state = model, state
        self._trail: Optional[DecodeTrail] = None

    def verify(self, token_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, self._trail, hidden = self.model.decode_many(token_ids, self.state)
        return logits, hidden

    def commit(self, kept: int) -> None:
        if self._trail is None:
            raise ValueError("commit needs a verify first (and applies it once)")
        self.state, self._trail = self.model.state_after(self.state, self._trail, kept), None


Verifier = Union[StateVerifier, StaticDecoder]


def accept_drafts(
    drafts: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[int, torch.Tensor]:
    """The speculative-sampling decision. drafts (k,), draft_probs (k, V) the distributions they were
    drawn from (ignored when greedy), target_logits (k + 1, V). Returns (accepted count n, next token (1,)):
    drafts[:n] are kept and next token follows them."""
    k = drafts.numel()
    if temperature <= 0:
        best = target_logits.argmax(-1)
        mismatch = (drafts != best[:k]).nonzero()
        n = k if mismatch.numel() == 0 else int(mismatch[0, 0])
        return n, best[n : n + 1]
    p = filtered_probs(target_logits, temperature, top_k, top_p)
    if k > 0:
        if draft_probs is None:
            raise ValueError("accept_drafts: sampling (temperature > 0) needs draft_probs, the drafts' distributions")
        rows = torch.arange(k, device=p.device)
        p_x, q_x = p[rows, drafts], draft_probs[rows, drafts]
        u_device = generator.device if generator is not None else p.device
        u = torch.rand(k, generator=generator, device=u_device).to(p.device)
        rejected = (u * q_x >= p_x).nonzero()  # accept iff u < p/q, i.e. with probability min(1, p/q)
        if rejected.numel():
            n = int(rejected[0, 0])
            residual = (p[n] - draft_probs[n]).clamp(min=0)
            if not bool(residual.sum() > 0):  # p == q up to rounding: rejection had ~zero probability
                residual = p[n]
            return n, sample_from_probs(residual[None], generator)
    return k, sample_from_probs(p[k : k + 1], generator)


def verify_drafts(
    target: HydraLM,
    state: DecodeState,
    pending: torch.Tensor,
    drafts: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> RoundResult:
    """One verification: `state` covers the stream up to (excluding) pending (1,); drafts (k,) follow it.

    One multi-token step over [pending, drafts] scores all k drafts and the bonus position at once; the new
    state is built from `state` (left intact) and that step's trail for [pending, accepted drafts] only.
    """
    verifier = StateVerifier(target, state)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    n, next_token, hidden = verify_round(verifier, pending, drafts, draft_probs, drafts.numel(), sampling, generator)
    return RoundResult(n, next_token, verifier.state, hidden)


def verify_round(
    verifier: Verifier,
    pending: torch.Tensor,
    drafts: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    usable: int,
    sampling: dict,
    generator: Optional[torch.Generator],
) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """Verify [pending, drafts] and commit the accepted prefix. Only the first `usable` drafts may be accepted
    (the last round of a generation needs fewer than were drafted): the logits up to them depend on nothing
    after them, so this is the decision over those drafts alone. Returns (accepted count n, next token (1,),
    hidden state (1, d) at the last kept token)."""
    logits, hidden = verifier.verify(torch.cat([pending, drafts])[None])
    probs = None if draft_probs is None else draft_probs[:usable]
    n, next_token = accept_drafts(drafts[:usable], probs, logits[0, : usable + 1], generator=generator, **sampling)
    hidden = hidden[:, n].clone()  # a copy: a StaticDecoder's next verify overwrites its buffer
    verifier.commit(n + 1)
    return n, next_token, hidden


def _draw(logits: torch.Tensor, sampling: dict, generator) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A draft token (1,) and the distribution (1, V) it was drawn from (None when greedy)."""
    if sampling["temperature"] <= 0:
        return logits.argmax(-1), None
    q = filtered_probs(logits, **sampling)
    return sample_from_probs(q, generator), q


def _greedy_self_draft(
    decoder: StaticDecoder,
    pending: torch.Tensor,
    hidden: torch.Tensor,
    k: int,
    max_new_tokens: int,
    eos_token_id: Optional[int],
    emitted: List[torch.Tensor],
    stats: "SpeculativeStats",
) -> None:
    """Greedy self-draft rounds fused on the device (``StaticDecoder.greedy_round``: drafts, verify, acceptance
    and commit in one graph). The host reads the accepted counts once per burst of rounds, sized so that the
    burst cannot pass max_new_tokens by a whole round (each round emits 1 .. k + 1 tokens). Tokens and stats are
    the round-by-round loop's: a round keeps only the drafts that fit before max_new_tokens (greedy decisions
    do not depend on later drafts), and nothing after the round that emits eos counts."""
    n_new, done = 1, False
    while n_new < max_new_tokens and not done:
        outputs = []
        for _ in range(-(-(max_new_tokens - n_new) // (k + 1))):
            tokens, count, pending, hidden = decoder.greedy_round(pending, hidden, k)
            outputs.append((tokens, count))
        counts = torch.stack([count for _, count in outputs]).tolist()  # the burst's one host read
        for (tokens, _), count in zip(outputs, counts):
            if n_new >= max_new_tokens or done:
                break
            usable = min(k, max_new_tokens - n_new - 1)
            n = min(count - 1, usable)
            new = tokens[: n + 1]
            emitted.append(new)
            n_new += n + 1
            stats.count_round(usable, n)
            stats.draft_calls += k
            done = eos_token_id is not None and bool((new == eos_token_id).any())


class MTPDrafter:
    """Self-draft: MTP module i turns (h^{i-1}, the token i ahead of the last fed position) into the
    distribution of the token i + 1 ahead. No state of its own: the target's last hidden state is enough.
    `step`: ``StaticDecoder.mtp_step`` (compiled / a CUDA graph with the decoder), else the module itself."""

    def __init__(self, model, step: Optional[Callable] = None):
        self.model, self.calls = model, 0
        self.hidden: Optional[torch.Tensor] = None  # set by start, then by every commit
        self.step = step if step is not None else self._eager_step

    def _eager_step(self, depth: int, hidden: torch.Tensor, token: torch.Tensor):
        return self.model.mtp.draft_step(depth, hidden, token, self.model.embed, self.model.lm_head)

    def start(self, first_token: torch.Tensor, hidden: torch.Tensor) -> None:
        self.hidden = hidden

    def propose(self, pending: torch.Tensor, k: int, sampling: dict, generator):
        assert self.hidden is not None, "propose before start"
        h, token = self.hidden, pending
        drafts, probs = [], []
        for i in range(1, k + 1):
            h, logits = self.step(i, h, token)
            token, q = _draw(logits, sampling, generator)
            drafts.append(token)
            probs.append(q)
        self.calls += k
        return _pack(drafts, probs, pending)

    def commit(self, n_accepted: int, next_token: torch.Tensor, hidden: torch.Tensor) -> None:
        self.hidden = hidden


class ModelDrafter:
    """A separate (smaller) HydraLM with its own state. `unfed` holds the emitted tokens it has not seen
    yet; its intermediate states are kept during a round, so rolling it back is picking one of them."""

    def __init__(self, model: HydraLM, prompt: torch.Tensor, prefill_chunk_size: Optional[int]):
        self.model, self.calls = model, 0
        _, _, self.state = prefill(model, prompt, chunk_size=prefill_chunk_size)
        self.unfed: List[torch.Tensor] = []
        self._states: Optional[List[DecodeState]] = None
        self._drafts: Optional[List[torch.Tensor]] = None

    def start(self, first_token: torch.Tensor, hidden: torch.Tensor) -> None:
        self.unfed = [first_token]

    def propose(self, pending: torch.Tensor, k: int, sampling: dict, generator):
        self._states = self._drafts = None
        if k == 0:
            return _pack([], [], pending)
        ids = torch.cat(self.unfed)
        if ids.numel() == 1:
            logits, st = self.model.step(ids, self.state)
        else:
            out = self.model(ids[None], state=self.state, return_state=True)
            logits, st = out["logits"][:, -1], out["state"]
        states, drafts, probs = [st], [], []
        for i in range(k):
            token, q = _draw(logits, sampling, generator)
            drafts.append(token)
            probs.append(q)
            if i < k - 1:
                logits, st = self.model.step(token, st)
                states.append(st)
        self.calls += k
        self._states, self._drafts = states, drafts  # states[i]: after unfed + the first i drafts
        return _pack(drafts, probs, pending)

    def commit(self, n_accepted: int, next_token: torch.Tensor, hidden: torch.Tensor) -> None:
        if self._states is None or self._drafts is None:  # nothing was drafted (last round): the state did not move
            self.unfed = self.unfed + [next_token]
        elif n_accepted < len(self._drafts):
            self.state, self.unfed = self._states[n_accepted], [next_token]
        else:  # all accepted: the last draft was never fed to the draft model
            self.state, self.unfed = self._states[-1], [self._drafts[-1], next_token]


def _pack(drafts, probs, like: torch.Tensor):
    if not drafts:
        return like.new_zeros(0), None
    return torch.cat(drafts), (None if probs[0] is None else torch.cat(probs))


def speculative_generate(
    target: HydraLM,
    draft: Optional[HydraLM],
    prompt_ids: Union[torch.Tensor, Sequence[int]],
    max_new_tokens: int,
    k: int = 4,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    prefill_chunk_size: Optional[int] = PREFILL_CHUNK_SIZE,
    decoder: str = "auto",
) -> Tuple[torch.Tensor, SpeculativeStats]:
    """Speculative decoding of one sequence. draft: a HydraLM with the target's vocabulary, or None to
    self-draft with the target's MTP head (needs target.cfg.mtp_depth > 0; k is capped at mtp_depth).

    prompt_ids: 1-D, (1, L) or a list of ints. Returns (prompt + new tokens, same rank as a tensor
    prompt, 2-D for a list; the new tokens stop after eos_token_id or max_new_tokens, stats).

    decoder: what verifies the drafts, as in ``generate``: "step" (``decode_many`` on state values), "static"
    (a StaticDecoder's fixed-shape buffers), "graph" (that, compiled: CUDA graphs on a GPU, the MTP draft steps
    too), "auto" ("graph" when ``generate`` would take it, else "step"). The decoder is the one ``generate``
    caches on the model for batch 1; each number of verified tokens (k + 1) compiles its own verify step.
    """
    check_sampling(temperature, top_k, top_p)
    for name, value, low in (("max_new_tokens", max_new_tokens, 0), ("k", k, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if draft is None:
        depth = target.cfg.mtp_depth
        if depth == 0 or target.mtp is None:
            raise ValueError(
                "speculative_generate(draft=None) drafts with the target's MTP head, but target.cfg.mtp_depth "
                "is 0; pass a draft model or use a target with mtp_depth > 0"
            )
        k = min(k, depth)
    elif draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(
            f"draft vocab_size={draft.cfg.vocab_size} differs from the target's "
            f"{target.cfg.vocab_size}; speculative sampling compares their distributions token by token"
        )
    device = model_device(target)
    decoder = _pick_decoder(target, decoder, max_new_tokens, device)
    if draft is not None and model_device(draft) != device:
        raise ValueError(f"draft is on {model_device(draft)} but the target is on {device}")
    if torch.is_tensor(prompt_ids):
        check_integer(prompt_ids)
    one_d = torch.is_tensor(prompt_ids) and prompt_ids.dim() == 1
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    prompt = prompt[None] if prompt.dim() == 1 else prompt
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise ValueError(
            f"speculative_generate decodes one sequence: prompt_ids must be 1-D or (1, L) with L >= 1, got "
            f"shape {tuple(prompt.shape)}; call it once per row, or use hydralm.generate for batches"
        )
    sampling: Dict[str, Any] = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    stats = SpeculativeStats(k=k, proposed_by_depth=[0] * k, accepted_by_depth=[0] * k)
    started = time.perf_counter()
    emitted = []
    with inference_mode(target, draft):
        if max_new_tokens > 0:
            logits, hidden, state = prefill(target, prompt, chunk_size=prefill_chunk_size)
            verifier: Verifier = StateVerifier(target, state)
            if decoder != "step" and max_new_tokens > 1:  # one new token needs no verification, nor a compile
                verifier = _static_decoder(target, state, decoder, 1)
            if draft is None:
                drafter: Any = MTPDrafter(target, verifier.mtp_step if isinstance(verifier, StaticDecoder) else None)
            else:
                drafter = ModelDrafter(draft, prompt, prefill_chunk_size)
            pending = sample_next(logits, generator=generator, **sampling)
            drafter.start(pending, hidden)
            emitted.append(pending)
            n_new, done = 1, eos_token_id is not None and int(pending) == eos_token_id
            if draft is None and temperature <= 0 and isinstance(verifier, StaticDecoder) and not done:
                _greedy_self_draft(verifier, pending, hidden, k, max_new_tokens, eos_token_id, emitted, stats)
            else:
                while n_new < max_new_tokens and not done:
                    usable = min(k, max_new_tokens - n_new - 1)
                    # a static decoder verifies k + 1 tokens every round: one shape, one compiled graph
                    drafted = k if isinstance(verifier, StaticDecoder) else usable
                    drafts, draft_probs = drafter.propose(pending, drafted, sampling, generator)
                    n, next_token, h = verify_round(verifier, pending, drafts, draft_probs, usable, sampling, generator)
                    drafter.commit(n, next_token, h)
                    new = torch.cat([drafts[:n], next_token])
                    emitted.append(new)
                    n_new += new.numel()
                    stats.count_round(usable, n)
                    pending = next_token
                    done = eos_token_id is not None and bool((new == eos_token_id).any())
            stats.draft_calls += drafter.calls
    tokens = torch.cat(emitted) if emitted else prompt.new_zeros(0)
    if eos_token_id is not None:
        hits = (tokens == eos_token_id).nonzero()
        if hits.numel():
            tokens = tokens[: int(hits[0, 0]) + 1]
    tokens = tokens[:max_new_tokens]
    stats.new_tokens = tokens.numel()
    stats.elapsed_seconds = time.perf_counter() - started
    out = torch.cat([prompt[0], tokens])
    return (out if one_d else out[None]), stats
