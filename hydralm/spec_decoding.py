"""Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for HydraLM.

One round, with the target state covering every emitted token except the last one (``pending``):
  1. the drafter proposes d_1..d_k with distributions q_1..q_k: either the target's own MTP head
     (self-draft, k <= mtp_depth) or a second, smaller HydraLM with its own state;
  2. one parallel target forward over [pending, d_1..d_k], starting from the kept state, gives the target
     distributions p_0..p_k (p_{i-1} is the distribution of the token d_i stands for);
  3. d_i is accepted with probability min(1, p_{i-1}(d_i) / q_i(d_i)); at the first rejection the round
     emits a token from normalize(max(0, p_{i-1} - q_i)); when all k are accepted it emits a bonus token
     from p_k. Every emitted token is then distributed exactly as under plain sampling from the target;
  4. the new state: the verify forward's state if all drafts were accepted, otherwise a second forward
     (one step when no draft was accepted) over [pending, accepted drafts] from the kept pre-round state.
     States are values (a forward never changes what an older state holds), so keeping the pre-round state
     is a free, exact checkpoint: no trace of a rejected token can remain in any layer (DeltaNet S, conv
     caches, SWA ring, retrieval bank). See docs/inference.md.

Greedy (temperature <= 0) accepts d_i iff it is the argmax of p_{i-1} and emits the argmax at the first
mismatch, so it produces greedy ``generate``'s tokens. Batch size 1.
"""

import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from hydralm.generation import PREFILL_CHUNK_SIZE, check_integer, inference_mode, model_device, prefill
from hydralm.model import HydraLM
from hydralm.modules.mixer import DecodeState
from hydralm.token_sampling import check_sampling, filtered_probs, sample_from_probs, sample_next


@dataclass
class SpeculativeStats:
    """Counts of one ``speculative_generate`` call. A round is one verification forward of the target."""

    k: int = 0  # drafts per round asked for (after capping at the MTP depth for self-draft)
    new_tokens: int = 0  # tokens generated (the first one comes from the prefill, not from a round)
    rounds: int = 0
    proposed: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens accepted
    target_forwards: int = 0  # target forwards after prefill: one verify per round + one rebuild per rejection
    draft_calls: int = 0  # draft-model forwards/steps, or MTP module calls for self-draft
    elapsed_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verification forward (accepted drafts + the corrected or bonus token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "tokens_per_round": self.tokens_per_round}


class RoundResult(NamedTuple):
    n_accepted: int
    next_token: torch.Tensor  # (1,): the corrected or bonus token, not yet fed to the target
    state: DecodeState  # target state after [pending, accepted drafts]
    hidden: torch.Tensor  # (1, d) target hidden state at the last fed token (what the MTP head drafts from)
    rebuilt: bool  # a rejection forced the second forward from the pre-round state


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

    The parallel forward over [pending, drafts] scores all k drafts and the bonus position at once. On a
    rejection its state has consumed rejected tokens, so the state is rebuilt by a forward over
    [pending, accepted drafts] from `state`, which that first forward left intact; when no draft was
    accepted that is one `step` over pending (the same state, claim C1, at a third of a short forward's host
    time: `python -m benchmarks.profile_decode`).
    """
    ids = torch.cat([pending, drafts])[None]
    out = target(ids, state=state, return_state=True, return_hidden=True)
    n, next_token = accept_drafts(drafts, draft_probs, out["logits"][0], temperature, top_k, top_p, generator)
    if n == drafts.numel():
        return RoundResult(n, next_token, out["state"], out["hidden"][:, -1], False)
    if n == 0:  # only `pending` is kept: one decode step rebuilds the state, with far fewer calls than a forward
        _, kept_state, hidden = target.step_hidden(pending, state)
        return RoundResult(0, next_token, kept_state, hidden, True)
    kept = target(ids[:, : n + 1], state=state, return_state=True, return_hidden=True)
    return RoundResult(n, next_token, kept["state"], kept["hidden"][:, -1], True)


def _draw(logits: torch.Tensor, sampling: dict, generator) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A draft token (1,) and the distribution (1, V) it was drawn from (None when greedy)."""
    if sampling["temperature"] <= 0:
        return logits.argmax(-1), None
    q = filtered_probs(logits, **sampling)
    return sample_from_probs(q, generator), q


class MTPDrafter:
    """Self-draft: MTP module i turns (h^{i-1}, the token i ahead of the last fed position) into the
    distribution of the token i + 1 ahead. No state of its own: the target's last hidden state is enough."""

    def __init__(self, model):
        self.model, self.hidden, self.calls = model, None, 0

    def start(self, first_token: torch.Tensor, hidden: torch.Tensor) -> None:
        self.hidden = hidden

    def propose(self, pending: torch.Tensor, k: int, sampling: dict, generator):
        m, h, token = self.model, self.hidden, pending
        drafts, probs = [], []
        for i in range(1, k + 1):
            h, logits = m.mtp.draft_step(i, h, token, m.embed, m._head)
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
) -> Tuple[torch.Tensor, SpeculativeStats]:
    """Speculative decoding of one sequence. draft: a HydraLM with the target's vocabulary, or None to
    self-draft with the target's MTP head (needs target.cfg.mtp_depth > 0; k is capped at mtp_depth).

    prompt_ids: 1-D, (1, L) or a list of ints. Returns (prompt + new tokens, same rank as a tensor
    prompt, 2-D for a list; the new tokens stop after eos_token_id or max_new_tokens, stats).
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
    stats = SpeculativeStats(k=k)
    started = time.perf_counter()
    emitted = []
    with inference_mode(target, draft):
        if max_new_tokens > 0:
            logits, hidden, state = prefill(target, prompt, chunk_size=prefill_chunk_size)
            drafter = MTPDrafter(target) if draft is None else ModelDrafter(draft, prompt, prefill_chunk_size)
            pending = sample_next(logits, generator=generator, **sampling)
            drafter.start(pending, hidden)
            emitted.append(pending)
            n_new, done = 1, eos_token_id is not None and int(pending) == eos_token_id
            while n_new < max_new_tokens and not done:
                k_round = min(k, max_new_tokens - n_new - 1)
                drafts, draft_probs = drafter.propose(pending, k_round, sampling, generator)
                result = verify_drafts(target, state, pending, drafts, draft_probs, generator=generator, **sampling)
                drafter.commit(result.n_accepted, result.next_token, result.hidden)
                new = torch.cat([drafts[: result.n_accepted], result.next_token])
                emitted.append(new)
                n_new += new.numel()
                stats.rounds += 1
                stats.proposed += k_round
                stats.accepted += result.n_accepted
                stats.target_forwards += 1 + int(result.rebuilt)
                state, pending = result.state, result.next_token
                done = eos_token_id is not None and bool((new == eos_token_id).any())
            stats.draft_calls = drafter.calls
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
