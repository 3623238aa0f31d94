"""HydraLM.decode_many (T tokens against the fixed-shape decode state in one pass) equals T decode steps, and
state_after builds the state after any prefix of them with no trace of the others (claim C1: fp32, 1e-4)."""

import pytest
import torch
from helpers import LAYER_SETS, assert_states_close, static_model, tiny

from hydralm.state import clone_state, states_equal
from hydralm.static_decode import StaticDecoder

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4  # claim C1, fp32


def rounds_against_steps(model, verify, commit, state, rounds: int, tokens: int, seed: int = 0) -> float:
    """Speculative-style rounds: verify `tokens` random tokens, keep a random prefix of them; every round's logits,
    hidden states and kept state are compared with decode steps over the same tokens. Returns the worst logit gap."""
    gen = torch.Generator().manual_seed(seed)
    batch, worst = state[0].batch_size, 0.0
    with torch.no_grad():
        for _ in range(rounds):
            ids = torch.randint(0, model.cfg.vocab_size, (batch, tokens), generator=gen)
            logits, hidden = verify(ids)
            kept = int(torch.randint(1, tokens + 1, (1,), generator=gen))
            stepped, kept_state = state, None
            for t in range(tokens):
                step_logits, stepped, step_hidden = model.decode_step(ids[:, t], stepped)
                torch.testing.assert_close(logits[:, t], step_logits, rtol=0, atol=ATOL)
                torch.testing.assert_close(hidden[:, t], step_hidden, rtol=0, atol=ATOL)
                worst = max(worst, float((logits[:, t] - step_logits).abs().max()))
                if t + 1 == kept:
                    kept_state = stepped
            new_state = commit(kept)
            assert_states_close(new_state, kept_state, atol=ATOL)
            state = kept_state
    return worst


class Eager:
    """model.decode_many / state_after on state values."""

    def __init__(self, model, state):
        self.model, self.state, self.trail = model, state, None

    def verify(self, ids):
        logits, self.trail, hidden = self.model.decode_many(ids, self.state)
        return logits, hidden

    def commit(self, kept):
        self.state = self.model.state_after(self.state, self.trail, kept)
        return self.state


def prefilled(model, length: int, batch: int = 2):
    with torch.no_grad():
        return model(torch.randint(0, model.cfg.vocab_size, (batch, length)), return_state=True)["state"]


@pytest.mark.parametrize("layers", list(LAYER_SETS))
@pytest.mark.parametrize("tokens", [3, 6])  # 6 > retrieval_chunk_size = 4: more than one chunk completes
def test_decode_many_equals_decode_steps(layers, tokens):
    model = tiny(layers, n_kv_heads=1)  # grouped-query attention: 2 query heads per key/value head
    state = prefilled(model, 7)  # a chunk in progress, the SWA ring about to wrap
    eager = Eager(model, state)
    rounds_against_steps(model, eager.verify, eager.commit, state, rounds=4, tokens=tokens)


@pytest.mark.parametrize("memory", [True, False])
def test_decode_many_through_chunk_completion_compression_and_eviction(memory):
    """Retrieval with and without compressive memory (chunks of 8, 2 exact, a pool of 4 compressed): rounds of 3
    tokens from 21 run through chunk completions inside a round, compression, eviction and the SWA ring's wrap."""
    model = static_model() if memory else static_model(memory=None)
    state = prefilled(model, 21)
    eager = Eager(model, state)
    rounds_against_steps(model, eager.verify, eager.commit, state, rounds=25, tokens=3)
    retrieval = eager.state[2]
    assert retrieval.completed >= 8 and (retrieval.evicted > 0 if memory else retrieval.n_chunks >= 8)


def test_static_decoder_verify_and_commit_match_decode_steps():
    """The fixed-shape path (device counters, every write masked), as it is compiled and captured: rounds of 3
    and of 10 tokens (more than one chunk) through compression and eviction."""
    model = static_model()
    state = prefilled(model, 21)
    decoder = StaticDecoder(model, state)

    def commit(kept):
        decoder.commit(kept)
        return decoder.state

    stepped = rounds_against_steps(model, decoder.verify, commit, clone_state(state), rounds=20, tokens=3)
    assert stepped < ATOL and decoder.state[2].evicted > 0
    rounds_against_steps(model, decoder.verify, commit, clone_state(decoder.state), rounds=4, tokens=10, seed=1)


@pytest.mark.parametrize("model_kind", ["mixed", "memory"])
def test_state_after_keeps_nothing_of_the_tokens_it_drops(model_kind):
    """The state after a kept prefix is bit-identical whatever followed it, and the state verified from is
    untouched: rollback is exact."""
    model = tiny("mixed") if model_kind == "mixed" else static_model()
    state = prefilled(model, 13 if model_kind == "mixed" else 22, batch=1)  # kept tokens complete a chunk
    snapshot = clone_state(state)
    prefix = torch.randint(0, 64, (1, 3))
    with torch.no_grad():
        kept_states = []
        for seed in (1, 2):
            rest = torch.randint(0, 64, (1, 2), generator=torch.Generator().manual_seed(seed))
            logits, trail, hidden = model.decode_many(torch.cat([prefix, rest], 1), state)
            kept_states.append(model.state_after(state, trail, 3))
    assert states_equal(*kept_states)
    assert states_equal(state, snapshot)


@pytest.mark.slow
def test_compiled_verify_and_commit_match_the_eager_ones():
    model = static_model()
    state = prefilled(model, 21, batch=1)
    compiled, eager = StaticDecoder(model, state, compile=True), StaticDecoder(model, state)
    gen = torch.Generator().manual_seed(0)
    for kept in (3, 1, 2, 3, 2, 1, 3, 3):
        ids = torch.randint(0, 64, (1, 3), generator=gen)
        (a, ha), (b, hb) = compiled.verify(ids), eager.verify(ids)
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        torch.testing.assert_close(ha, hb, rtol=0, atol=ATOL)
        compiled.commit(kept)
        eager.commit(kept)
        assert_states_close(compiled.state, eager.state, atol=ATOL)


def test_clear_errors():
    model = static_model()
    state = prefilled(model, 5, batch=1)
    with pytest.raises(ValueError, match="tokens >= 1"):
        model.step_many(torch.zeros(1, 0, dtype=torch.long), state)
    with pytest.raises(ValueError, match="vocab_size"):
        model.step_many(torch.full((1, 2), 64), state)
    with torch.no_grad():
        _, trail, _ = model.step_many(torch.zeros(1, 2, dtype=torch.long), state)
    for kept in (0, 3, 1.0):
        with pytest.raises(ValueError, match=r"kept=.* must be an int in \[1, 2\]"):
            model.state_after(state, trail, kept)
    decoder = StaticDecoder(model, state)
    with pytest.raises(ValueError, match="verify first"):
        decoder.commit(1)
    with pytest.raises(ValueError, match=r"shape \(1, T >= 1\)"):
        decoder.verify(torch.zeros(2, 3, dtype=torch.long))
    decoder.verify(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"kept=4 must be an int in \[1, 3\]"):
        decoder.commit(4)
