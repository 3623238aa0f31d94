"""speculative_generate(): greedy output = greedy generate, rejected drafts leave no trace in the state,
and sampled output follows the target's distribution (statistical tests with fixed seeds)."""

import copy
import itertools

import pytest
import torch
from helpers import LAYER_SETS, assert_states_close, static_model, tiny  # noqa: F401
from scipy.stats import chi2

from hydralm import HydraConfig, HydraLM
from hydralm.generation import generate
from hydralm.spec_decoding import accept_drafts, speculative_generate, verify_drafts
from hydralm.state import clone_state, states_equal
from hydralm.token_sampling import filtered_probs, sample_from_probs

pytestmark = pytest.mark.usefixtures("single_thread")


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = counts.sum()
    assert (counts[probs == 0] == 0).all(), "a token of probability 0 was emitted"
    expected = n * probs
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    if int(keep.sum()) < 2:  # one possible outcome: the zero-probability check above is the whole test
        return 1.0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return float(chi2.sf(stat, int(keep.sum()) - 1))


# -- greedy equivalence ----------------------------------------------------------------------------
@pytest.mark.parametrize("layers", list(LAYER_SETS))
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("drafter", ["mtp", "model"])
def test_greedy_speculative_equals_greedy_generate(layers, k, drafter):
    target = tiny(layers)
    draft = None if drafter == "mtp" else tiny("deltanet", seed=1, mtp_depth=0, d_model=16)
    prompt = torch.randint(0, 64, (1, 7))
    expected = generate(target, prompt, 24, temperature=0)
    out, stats = speculative_generate(target, draft, prompt, 24, k=k, temperature=0)
    assert torch.equal(out, expected)
    assert stats.new_tokens == 24 and stats.k == (min(k, 2) if drafter == "mtp" else k)
    assert stats.proposed > 0 and stats.accepted + stats.rounds == 23  # every token after the first
    assert stats.target_forwards == stats.rounds  # one verify step per round, no rebuild after a rejection


@pytest.mark.parametrize("drafter", ["mtp", "model"])
def test_greedy_speculative_on_a_static_decoder_equals_greedy_generate(drafter):
    """Verification on a StaticDecoder's fixed-shape buffers (what is compiled and captured on a GPU), through
    chunk completions, compression, eviction and the SWA ring's wrap; the last round drafts k and may accept
    fewer (one verify shape)."""
    target = static_model(mtp_depth=2)
    draft = None if drafter == "mtp" else tiny("deltanet", seed=1, mtp_depth=0, d_model=16)
    prompt = torch.randint(0, 64, (1, 19))
    expected = generate(target, prompt, 70, temperature=0, decoder="step")
    out, stats = speculative_generate(target, draft, prompt, 70, k=2, temperature=0, decoder="static")
    assert torch.equal(out, expected)
    assert stats.new_tokens == 70 and stats.accepted + stats.rounds == 69
    assert (1, "static", torch.device("cpu"), torch.float32) in target._static_decoders  # generate's cache


@pytest.mark.parametrize("stop", ["max_new_tokens", "eos"])
def test_fused_greedy_rounds_give_the_loops_tokens_and_stats(stop):
    """Greedy self-draft on a StaticDecoder runs each round on the device (StaticDecoder.greedy_round) and reads
    the accepted counts once per burst of rounds: the tokens and the acceptance stats equal the round-by-round
    loop's (decoder="step"), when max_new_tokens cuts a round short and when eos ends the generation."""
    target = static_model(mtp_depth=2)
    prompt = torch.randint(0, 64, (1, 19))
    new_tokens, eos = 53, None
    if stop == "eos":
        eos = int(generate(target, prompt, 40, temperature=0, decoder="step")[0, 19 + 30])  # a token of the output
    runs = {}
    for decoder in ("step", "static"):
        out, stats = speculative_generate(
            target, None, prompt, new_tokens, k=2, temperature=0, eos_token_id=eos, decoder=decoder
        )
        runs[decoder] = (out, stats)
    (out_loop, loop), (out_fused, fused) = runs["step"], runs["static"]
    assert torch.equal(out_fused, out_loop)
    assert (fused.new_tokens, fused.rounds, fused.proposed, fused.accepted) == (
        loop.new_tokens, loop.rounds, loop.proposed, loop.accepted
    )  # fmt: skip
    assert (fused.proposed_by_depth, fused.accepted_by_depth) == (loop.proposed_by_depth, loop.accepted_by_depth)
    if stop == "eos":
        assert int(out_fused[0, -1]) == eos and out_fused.shape[1] < 19 + new_tokens


def test_fused_greedy_rounds_test_fails_when_a_round_keeps_one_draft_too_many(monkeypatch):
    """Sabotage check of the comparison above: a round that keeps a draft the target disagrees with is caught."""
    from hydralm.static_decode import StaticDecoder

    original = StaticDecoder._greedy_round

    def one_too_many(self, pending, hidden, k):
        emitted, count, next_token, h = original(self, pending, hidden, k)
        return emitted, (count + 1).clamp(max=k + 1), next_token, h

    monkeypatch.setattr(StaticDecoder, "_greedy_round", one_too_many)
    with pytest.raises(AssertionError):
        test_fused_greedy_rounds_give_the_loops_tokens_and_stats("max_new_tokens")


def test_greedy_speculative_equals_greedy_generate_with_compressive_memory():
    """Memory compresses on the chunk schedule in every path, so the verify forward over [pending, drafts]
    reads what step decoding reads: the outputs agree past the exact window, through compression and eviction
    (40-token prompts, chunks of 8, 2 exact chunks, a pool of 4)."""
    memory = dict(exact_window=16, compress_every=4, pool_size=8)
    one_layer = dict(n_layers=1, layer_types=["retrieval"], retrieval_chunk_size=8, retrieval_top_k=1)
    target = tiny("retrieval", memory=memory, **one_layer)
    prompts = torch.randint(0, 64, (6, 40))
    expected = generate(target, prompts, 40, temperature=0)
    for prompt, tokens in zip(prompts, expected):
        out, stats = speculative_generate(target, None, prompt, 40, k=2, temperature=0)
        assert torch.equal(out, tokens) and stats.accepted < stats.proposed  # rejections: rollbacks happen


def test_greedy_with_a_perfect_draft_accepts_everything():
    """A draft identical to the target: every draft accepted, every round ends with a bonus token."""
    target = tiny("mixed")
    prompt = torch.randint(0, 64, (1, 5))
    out, stats = speculative_generate(target, copy.deepcopy(target), prompt, 21, k=4, temperature=0)
    assert torch.equal(out, generate(target, prompt, 21, temperature=0))
    assert stats.acceptance_rate == 1.0 and stats.rounds == 4 and stats.tokens_per_round == 5.0
    assert stats.target_forwards == stats.rounds


def test_mtp_self_draft_accepts_when_the_head_copies_the_main_head():
    """With its residual branch zeroed, MTP module k proposes what the main head would: accepted drafts
    on repetitive greedy paths, and the output is still exactly greedy generate."""
    target = tiny("mixed")
    for layer in target.mtp.layers:
        torch.nn.init.zeros_(layer.down.weight)
    prompt = torch.randint(0, 64, (1, 6))
    out, stats = speculative_generate(target, None, prompt, 30, k=2, temperature=0)
    assert torch.equal(out, generate(target, prompt, 30, temperature=0))
    assert 0 < stats.accepted < stats.proposed


def test_eos_and_one_dimensional_prompt():
    target = tiny("mixed")
    prompt = torch.randint(0, 64, (7,))
    free = generate(target, prompt, 20, temperature=0)
    eos = int(free[12])
    out, stats = speculative_generate(target, None, prompt, 20, k=2, temperature=0, eos_token_id=eos)
    hit = int((free[7:] == eos).nonzero()[0, 0])
    assert out.dim() == 1 and torch.equal(out, free[: 7 + hit + 1]) and stats.new_tokens == hit + 1


# -- rollback --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", list(LAYER_SETS))
def test_rejected_round_leaves_exactly_the_accepted_prefix(layers):
    """After a rejection the state holds [pending, accepted drafts] and nothing else: bit-identical whatever the
    rejected drafts were, within the C1 bound of stepping the accepted tokens, and the pre-round state itself
    is untouched."""
    target = tiny(layers)
    ids = torch.randint(0, 64, (1, 13))  # 13: retrieval banks hold completed chunks and a partial one
    with torch.no_grad():
        out = target(ids, return_state=True)
        state, pending = out["state"], out["logits"][:, -1].argmax(-1)
        snapshot = clone_state(state)
        # the greedy continuation, then corrupt the third draft: two accepted, one rejected
        cont, st = [], state
        logits, st = target.step(pending, clone_state(state))
        for _ in range(4):
            cont.append(logits.argmax(-1))
            logits, st = target.step(cont[-1], st)
        drafts = torch.cat(cont)
        drafts[2] = (drafts[2] + 1) % 64
        result = verify_drafts(target, state, pending, drafts, None, temperature=0)
        assert result.n_accepted == 2 and int(result.next_token) == int(cont[2])
        assert states_equal(state, snapshot)  # the verify step wrote nothing the old state reads

        other = drafts.clone()
        other[2:] = (other[2:] + 7) % 64  # other rejected tokens: no trace of either may remain
        again = verify_drafts(target, clone_state(snapshot), pending, other, None, temperature=0)
        assert again.n_accepted == 2 and states_equal(result.state, again.state)
        assert torch.equal(result.hidden, again.hidden)
        stepped = clone_state(snapshot)
        for token in torch.cat([pending, drafts[:2]]):
            _, stepped, hidden = target.step_hidden(token[None], stepped)
        assert_states_close(result.state, stepped, atol=1e-5)  # valid entries: banks cut to their used prefix
        torch.testing.assert_close(result.hidden, hidden, rtol=0, atol=1e-5)
        # and decoding goes on from the rolled-back state as if the rejected token had never been seen
        la, _ = target.step(result.next_token, result.state)
        lb, _ = target.step(result.next_token, stepped)
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layers", list(LAYER_SETS))
def test_round_that_rejects_the_first_draft_keeps_the_state_of_one_step_over_pending(layers):
    target = tiny(layers)
    ids = torch.randint(0, 64, (1, 13))
    with torch.no_grad():
        out = target(ids, return_state=True)
        state, pending = out["state"], out["logits"][:, -1].argmax(-1)
        snapshot = clone_state(state)
        logits, _ = target.step(pending, clone_state(state))
        drafts = (logits.argmax(-1) + 1) % 64  # never the greedy token: rejected at once
        result = verify_drafts(target, state, pending, torch.cat([drafts, drafts]), None, temperature=0)
        assert result.n_accepted == 0 and int(result.next_token) == int(logits.argmax(-1))
        assert states_equal(state, snapshot)  # the verify step wrote nothing into it
        _, stepped, hidden = target.step_hidden(pending, clone_state(snapshot))
        assert_states_close(result.state, stepped, atol=1e-5)
        torch.testing.assert_close(result.hidden, hidden, rtol=0, atol=1e-5)


# -- distribution ----------------------------------------------------------------------------------
def test_accept_drafts_preserves_the_target_distribution():
    """The decision rule alone: whatever q is, the first emitted token ~ p_0 and, after an accepted
    first draft, the second ~ p_1 (here p does not depend on the token, so this is exact)."""
    gen = torch.Generator().manual_seed(0)
    V, k, trials = 6, 2, 8000
    target_logits = torch.randn(k + 1, V, generator=gen)
    draft_probs = torch.softmax(torch.randn(k, V, generator=gen) * 1.5, -1)
    for settings in (dict(temperature=1.0), dict(temperature=0.8, top_k=4, top_p=0.95)):
        p = filtered_probs(target_logits, **settings)
        first, second = torch.zeros(V), torch.zeros(V)
        for _ in range(trials):
            drafts = sample_from_probs(draft_probs, gen)
            n, nxt = accept_drafts(drafts, draft_probs, target_logits, generator=gen, **settings)
            emitted = torch.cat([drafts[:n], nxt])
            first[emitted[0]] += 1
            if n >= 1:
                second[emitted[1]] += 1
        assert chi_square_pvalue(first, p[0]) > 1e-3
        assert chi_square_pvalue(second, p[1]) > 1e-3


def _exact_joint(target, prompt, settings):
    """P(t1, t2, t3) of sampling three tokens from the target with these settings: (V, V, V)."""
    V = target.cfg.vocab_size
    pairs = torch.tensor(list(itertools.product(range(V), repeat=2)))  # (V^2, 2): (t1, t2)
    with torch.no_grad():
        logits = target(torch.cat([prompt.expand(len(pairs), -1), pairs], 1))["logits"]
    p1 = filtered_probs(logits[0, -3], **settings)  # (V,)
    p2 = filtered_probs(logits[::V, -2], **settings)  # (V, V): row t1
    p3 = filtered_probs(logits[:, -1], **settings).view(V, V, V)  # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


@pytest.mark.parametrize(
    "drafter,settings,decoder",
    [
        ("mtp", dict(temperature=1.0), "step"),
        ("model", dict(temperature=0.8, top_k=6, top_p=0.9), "step"),
        ("mtp", dict(temperature=0.9, top_p=0.95), "static"),
    ],
)
def test_sampled_speculative_decoding_follows_the_target_distribution(drafter, settings, decoder):
    """Many independent runs (one generator seed each) of 4 new tokens with k=2: round 1 verifies two
    drafts (t2, t3), so the joint law of (t2, t3) covers accept/accept, accept/reject, reject + next
    round. It must match the target's exact law (chi-square, fixed seeds: deterministic). "static" verifies
    on a StaticDecoder (fixed shapes: the last round drafts k and accepts at most what is left)."""
    cfg = dict(vocab_size=8, d_model=16, n_heads=2, initializer_range=0.4, mtp_depth=2)
    torch.manual_seed(3)
    # one SWA layer keeps a run at a few ms; the decision rule does not depend on the layer type
    target = HydraLM(HydraConfig(n_layers=1, layer_types=["swa"], swa_window=4, **cfg)).eval()
    draft = None
    if drafter == "model":  # a related but different model: the target with perturbed weights
        draft = copy.deepcopy(target)
        with torch.no_grad():
            for param in draft.parameters():
                param.add_(0.5 * param.std() * torch.randn_like(param))
    prompt = torch.tensor([[1, 5, 2, 7]])
    joint = _exact_joint(target, prompt, settings).sum(0)  # P(t2, t3)
    runs = 1200 if decoder == "step" else 600  # the fixed-shape path: fewer runs keep the test short
    counts = torch.zeros(8, 8)
    proposed = accepted = 0
    for seed in range(runs):
        out, stats = speculative_generate(
            target, draft, prompt, 4, k=2, generator=torch.Generator().manual_seed(seed), decoder=decoder, **settings
        )
        counts[out[0, 5], out[0, 6]] += 1
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    pvalue = chi_square_pvalue(counts, joint)
    assert 0.2 < accepted / proposed < 0.9  # both acceptance and rejection are exercised
    assert pvalue > 1e-3


# -- errors ----------------------------------------------------------------------------------------
def test_clear_errors():
    target = tiny("mixed", mtp_depth=0)
    prompt = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="mtp_depth"):
        speculative_generate(target, None, prompt, 5)
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(tiny("mixed"), None, torch.randint(0, 64, (2, 4)), 5)
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(target, tiny("deltanet", vocab_size=32), prompt, 5)
    with pytest.raises(ValueError, match="k must be"):
        speculative_generate(tiny("mixed"), None, prompt, 5, k=0)
    model = tiny("mixed").train()
    out, stats = speculative_generate(model, None, prompt, 0)
    assert torch.equal(out, prompt) and stats.new_tokens == 0 and model.training
