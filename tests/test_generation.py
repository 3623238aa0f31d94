"""generate(): greedy = an argmax loop over the full parallel forward, ragged batches = one-by-one, EOS,
reproducible sampling; the sampling helpers and the state utilities it relies on."""

import pytest
import torch
from helpers import LAYER_SETS, tiny  # noqa: F401

from hydralm.generation import generate
from hydralm.state import clone_state, select_rows, stack_states, state_bytes, states_equal
from hydralm.token_sampling import filtered_probs, sample_next

pytestmark = pytest.mark.usefixtures("single_thread")


def argmax_loop(model, prompt, n):
    """Reference greedy decoding: re-run the whole prefix through the parallel forward for every token."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)["logits"][:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("layers", list(LAYER_SETS))
def test_greedy_equals_argmax_over_full_forward(layers):
    model = tiny(layers)
    prompt = torch.randint(0, 64, (2, 9))
    out = generate(model, prompt, 14, temperature=0)
    assert out.shape == (2, 23) and torch.equal(out[:, :9], prompt)
    assert torch.equal(out, argmax_loop(model, prompt, 14))
    assert len(set(out[:, 9:].flatten().tolist())) > 2  # a non-trivial path, not one repeated token


def test_chunked_prefill_gives_the_same_tokens():
    model = tiny()
    prompt = torch.randint(0, 64, (2, 23))
    assert torch.equal(
        generate(model, prompt, 10, temperature=0, prefill_chunk_size=5), generate(model, prompt, 10, temperature=0)
    )


def test_prefill_once_then_step(monkeypatch):
    """Only the prompt goes through the parallel forward; every new token costs one step."""
    model = tiny()
    forward_lengths, steps = [], []
    real_forward, real_step = model.forward, model.step
    monkeypatch.setattr(
        model, "forward", lambda ids, **kw: forward_lengths.append(ids.shape[1]) or real_forward(ids, **kw)
    )
    monkeypatch.setattr(model, "step", lambda ids, st: steps.append(1) or real_step(ids, st))
    generate(model, torch.randint(0, 64, (3, 11)), 20, temperature=0)
    assert forward_lengths == [11] and len(steps) == 19  # the last token needs no step


def test_ragged_prompts_match_one_by_one():
    model = tiny()
    rows = [torch.randint(0, 64, (n,)) for n in (5, 9, 5, 12, 1)]
    alone = [generate(model, r, 10, temperature=0) for r in rows]
    as_list = generate(model, rows, 10, temperature=0)
    padded = torch.zeros(len(rows), 12, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : r.numel()] = r
    as_padded = generate(model, padded, 10, temperature=0, prompt_lengths=[r.numel() for r in rows])
    for a, b, c in zip(alone, as_list, as_padded):
        assert a.dim() == 1 and torch.equal(a, b) and torch.equal(a, c)


def test_eos_stops_rows_and_pads():
    model = tiny()
    prompt = torch.randint(0, 64, (3, 6))
    free = generate(model, prompt, 16, temperature=0)[:, 6:]
    eos = int(free[0, 3])  # row 0 emits it at step 3 (or earlier)
    first = [(row == eos).nonzero()[0, 0].item() if (row == eos).any() else None for row in free]
    out = generate(model, prompt, 16, temperature=0, eos_token_id=eos, pad_token_id=63)[:, 6:]
    for row, row_free, hit in zip(out, free, first):
        if hit is None:
            assert torch.equal(row, row_free[: row.numel()])
        else:  # identical up to the first eos, then only padding
            assert torch.equal(row[: hit + 1], row_free[: hit + 1])
            assert (row[hit + 1 :] == 63).all()
    if all(h is not None for h in first):  # everyone finished: generation stopped early
        assert out.shape[1] == max(first) + 1
    # ragged output ends each row at its eos
    ragged = generate(model, list(prompt), 16, temperature=0, eos_token_id=eos)
    assert ragged[0].numel() == 6 + first[0] + 1 and int(ragged[0][-1]) == eos


def test_all_rows_finishing_stops_early():
    model = tiny()
    prompt = torch.randint(0, 64, (1, 6))
    free = generate(model, prompt, 12, temperature=0)
    eos = int(free[0, 8])
    out = generate(model, prompt, 12, temperature=0, eos_token_id=eos)
    hit = int((free[0, 6:] == eos).nonzero()[0, 0])
    assert torch.equal(out, free[:, : 6 + hit + 1])


def test_generator_makes_sampling_reproducible():
    model = tiny()
    prompt = torch.randint(0, 64, (2, 5))

    def run(seed, **kw):
        return generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert torch.equal(run(3, top_k=1), generate(model, prompt, 20, temperature=0))  # top_k=1 is greedy
    filtered = run(4, top_k=3, top_p=0.9)
    assert filtered.shape == (2, 25)


def test_training_flag_is_restored_and_no_graph_is_built():
    model = tiny().train()
    out = generate(model, torch.randint(0, 64, (1, 4)), 3)
    assert model.training and not out.requires_grad


def test_bad_arguments_raise_value_error():
    model = tiny()
    prompt = torch.randint(0, 64, (1, 4))
    for kwargs, match in [
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, **{"max_new_tokens": 3, **kwargs})
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, prompt, 3, prompt_lengths=[9])
    assert torch.equal(generate(model, prompt, 0), prompt)


# -- sampling ------------------------------------------------------------------------------------
def test_filtered_probs_top_k_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert torch.allclose(filtered_probs(logits, 1.0), torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert torch.allclose(filtered_probs(logits, 1.0, top_k=2), torch.tensor([[4 / 7, 3 / 7, 0, 0]]))
    # top_p=0.6: 0.4 < 0.6, 0.4 + 0.3 >= 0.6 -> keep two tokens
    assert torch.allclose(filtered_probs(logits, 1.0, top_p=0.6), torch.tensor([[4 / 7, 3 / 7, 0, 0]]))
    assert torch.allclose(filtered_probs(logits, 1.0, top_p=0.05), torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.equal(filtered_probs(logits, 0.0), torch.tensor([[1.0, 0, 0, 0]]))
    root = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).sqrt()  # temperature 2 takes the square root of p
    assert torch.allclose(filtered_probs(logits, 2.0), root / root.sum())


def test_sample_next_draws_from_filtered_probs():
    torch.manual_seed(0)
    logits = torch.randn(1, 6).expand(20000, 6)
    expected = filtered_probs(logits[:1], 0.7, top_k=4, top_p=0.95)[0]
    draws = sample_next(logits, 0.7, top_k=4, top_p=0.95, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert (freq[expected == 0] == 0).all()
    assert (freq - expected).abs().max() < 0.015  # ~4 standard errors at n = 20000


# -- state utilities -----------------------------------------------------------------------------
def test_state_utilities():
    model = tiny()
    ids = torch.randint(0, 64, (3, 18))
    with torch.no_grad():
        state = model(ids, return_state=True)["state"]
        copy = clone_state(state)
        assert states_equal(state, copy)
        stepped = state
        for _ in range(6):  # steps may write into spare bank capacity, never into what `state` holds
            _, stepped = model.step(ids[:, 0], stepped)
        assert states_equal(state, copy) and not states_equal(state, stepped)
        rows = select_rows(state, [2, 0])
        assert states_equal(stack_states([select_rows(state, [2]), select_rows(state, [0])]), rows)
        short = model(ids[:, :5], return_state=True)["state"]
        with pytest.raises(ValueError, match="same stream position|equal length"):
            stack_states([state, short])
    # state_bytes counts allocated storage: bank capacity included, compacted clone never larger
    assert state_bytes(state) >= state_bytes(clone_state(state)) > 0
    empty = model.init_state(1)
    assert state_bytes(empty) == sum(t.numel() * t.element_size() for layer in empty for t in layer.tensors().values())
