"""FactBank: claims C3 and C9 at small scale, FIFO rotation, padding, persistence, generation bias, bad input."""

import math

import pytest
import torch

from hydralm import HydraConfig, HydraLM
from hydralm.eval.factbank_claims import C3_THRESHOLD, C9_THRESHOLD, measure_c3, measure_c9
from hydralm.factbank import FactBank


# -- claims ----------------------------------------------------------------------------------------
def test_c3_write_then_query_returns_the_written_values():
    assert measure_c3(dims=(8, 64, 256), num_facts=128, value_dim=16) >= C3_THRESHOLD


@pytest.mark.parametrize("write_batch", [1, 7, 300])  # 300 > capacity: one write wraps the ring by itself
def test_c9_precision_at_1_on_the_newest_10_percent_after_10_rotations(write_batch):
    assert measure_c9(capacity=256, dim=32, value_dim=8, rotations=10, write_batch=write_batch) >= C9_THRESHOLD


# -- semantics -------------------------------------------------------------------------------------
def test_rotation_keeps_exactly_the_newest_capacity_entries():
    capacity, total = 16, 40
    keys, values = torch.randn(total, 8), torch.arange(total)
    bank = FactBank(8, capacity)
    for i in range(0, total, 3):  # uneven batches: some writes straddle the end of the ring
        bank.write(keys[i : i + 3], values[i : i + 3])
    assert len(bank) == capacity and bank.count == total
    got, scores = bank.query(keys, k=1)
    newest = range(total - capacity, total)
    assert got[list(newest), 0].tolist() == list(newest)  # every surviving key finds its own value (cosine 1)
    assert torch.allclose(scores[list(newest), 0], torch.ones(capacity))
    evicted = got[: total - capacity, 0]
    assert not (evicted == torch.arange(total - capacity)).any()  # overwritten facts are gone
    # Ages: 0 = newest ... capacity - 1 = oldest, one per slot.
    assert sorted(bank.ages.tolist()) == list(range(capacity))
    assert int(bank.ages[bank.serials == total - 1]) == 0


def test_a_write_larger_than_capacity_keeps_its_last_entries():
    bank = FactBank(4, capacity=3)
    keys = torch.randn(5, 4)
    bank.write(keys, torch.arange(5))
    assert bank.count == 5 and len(bank) == 3
    assert sorted(bank.serials.tolist()) == [2, 3, 4]
    got, _ = bank.query(keys[2:], k=1)
    assert got[:, 0].tolist() == [2, 3, 4]


def test_query_ranks_by_cosine_and_ignores_key_norms():
    bank = FactBank(2, capacity=4)
    angles = torch.tensor([0.0, 0.3, 1.0, 2.0])
    keys = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [10.0], [0.1], [3.0]])
    bank.write(keys, torch.arange(4))
    values, scores = bank.query(torch.tensor([[5.0, 0.0]]), k=4)
    assert values[0].tolist() == [0, 1, 2, 3]
    assert torch.allclose(scores[0], angles.cos(), atol=1e-6)


def test_equal_scores_go_to_the_newest_entry():
    bank = FactBank(3, capacity=9)  # holds all 9 writes
    key = torch.tensor([[1.0, 2.0, 3.0]])
    for version in range(3):  # the same fact, updated twice
        bank.write(key, torch.tensor([version]))
        bank.write(torch.randn(2, 3), torch.tensor([-5, -5]))
    values, scores = bank.query(key, k=3)
    assert values[0].tolist() == [2, 1, 0] and scores[0, 0] == scores[0, 2]


def test_fewer_valid_entries_than_k_pads_with_nan_scores():
    bank = FactBank(4, capacity=10)
    values, scores = bank.query(torch.randn(2, 4), k=3)  # empty bank
    assert values.shape == (2, 3) and torch.isnan(scores).all() and torch.isnan(values).all()
    bank.write(torch.randn(2, 4), torch.randn(2, 5))
    values, scores = bank.query(torch.randn(3, 4), k=4)
    assert values.shape == (3, 4, 5) and scores.shape == (3, 4)
    assert torch.isfinite(scores[:, :2]).all() and torch.isnan(scores[:, 2:]).all()
    assert torch.isnan(values[:, 2:]).all() and torch.isfinite(values[:, :2]).all()
    ints = FactBank(4, capacity=10)
    ints.write(torch.randn(1, 4), torch.tensor([[7, 8]]))
    values, scores = ints.query(torch.randn(1, 4), k=2)
    assert values.tolist() == [[[7, 8], [-1, -1]]] and math.isnan(scores[0, 1])


def test_values_keep_any_trailing_shape_and_integer_dtype():
    bank = FactBank(6, capacity=5)
    values = torch.randint(0, 1000, (3, 2, 4))
    keys = torch.randn(3, 6)
    bank.write(keys, values)
    got, _ = bank.query(keys, k=1)
    assert got.dtype == torch.int64 and torch.equal(got[:, 0], values)
    with pytest.raises(ValueError, match=r"per-entry shape \(4,\).*\(2, 4\)"):
        bank.write(torch.randn(1, 6), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        bank.write(torch.randn(1, 6), torch.zeros(1, 2, 4))
    bank.clear()
    assert len(bank) == 0 and bank.count == 0 and bank.value_shape is None
    bank.write(torch.randn(1, 6), torch.zeros(1, 9))  # a new value shape after clear()
    assert bank.value_shape == (9,)


def test_state_dict_round_trips_through_torch_save_with_weights_only(tmp_path):
    bank = FactBank(8, capacity=6)
    keys, values = torch.randn(10, 8), torch.randn(10, 3)
    bank.write(keys, values)
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    state = torch.load(tmp_path / "bank.pt", weights_only=True)
    restored = FactBank(8, capacity=6)
    restored.load_state_dict(state)
    rebuilt = FactBank.from_state_dict(state)
    for other in (restored, rebuilt):
        assert other.count == 10 and len(other) == 6 and torch.equal(other.ages, bank.ages)
        for a, b in zip(other.query(keys, k=3), bank.query(keys, k=3)):
            assert torch.equal(a.nan_to_num(-9), b.nan_to_num(-9))
    other.write(keys[:1], values[:1])  # keeps rotating from where the original stopped
    assert other.count == 11 and int(other.serials.max()) == 10
    with pytest.raises(ValueError, match="capacity=6 does not match this bank's capacity=7"):
        FactBank(8, capacity=7).load_state_dict(state)
    with pytest.raises(ValueError, match="expected a dict with keys"):
        FactBank(8, capacity=6).load_state_dict({"keys": state["keys"]})


def test_state_bytes_counts_the_allocated_tensors():
    bank = FactBank(16, capacity=100)
    assert bank.state_bytes == 100 * 16 * 4 + 100 * 8
    bank.write(torch.randn(1, 16), torch.randn(1, 32))
    assert bank.state_bytes == 100 * 16 * 4 + 100 * 8 + 100 * 32 * 4


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FactBank(0, 4), "dim=0"),
        (lambda: FactBank(4, 0), "capacity=0"),
        (lambda: FactBank(4, 2.5), "capacity=2.5"),
        (lambda: FactBank(4, 4, dtype=torch.int64), "dtype"),
        (
            lambda: FactBank(4, 4).write(torch.randn(2, 5), torch.randn(2, 1)),
            r"keys must be a 2-D tensor \(n, dim=4\), got \(2, 5\)",
        ),
        (lambda: FactBank(4, 4).write(torch.randn(4), torch.randn(1, 1)), r"keys must be a 2-D tensor .* got \(4,\)"),
        (lambda: FactBank(4, 4).write(torch.randn(2, 4), torch.randn(3, 1)), r"values must be a tensor \(n=2"),
        (lambda: FactBank(4, 4).write(torch.full((1, 4), math.nan), torch.randn(1, 1)), "keys contain NaN"),
        (lambda: FactBank(4, 4).query(torch.randn(1, 3)), r"keys must be a 2-D tensor \(n, dim=4\)"),
        (lambda: FactBank(4, 4).query(torch.randn(1, 4), k=0), "k=0"),
        (lambda: FactBank(4, 4).logit_bias(torch.randn(1, 4), vocab_size=0), "vocab_size=0"),
    ],
)
def test_bad_inputs_raise_a_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- mixing into generation ------------------------------------------------------------------------
def test_logit_bias_pushes_the_tokens_of_retrieved_facts():
    bank = FactBank(4, capacity=8)
    keys = torch.eye(4)
    bank.write(keys[:2], torch.tensor([[5, 6, -1], [7, 7, 9]]))  # -1 = padding inside a value
    bias = bank.logit_bias(keys, vocab_size=12, k=1, strength=3.0, min_score=0.5)
    assert bias.shape == (4, 12)
    assert bias[0].nonzero().flatten().tolist() == [5, 6] and torch.allclose(bias[0, [5, 6]], torch.tensor(3.0))
    assert bias[1].nonzero().flatten().tolist() == [7, 9] and float(bias[1, 7]) == 3.0  # repeats count once
    assert (bias[2:] == 0).all()  # orthogonal queries: score 0 < min_score, no bias
    embeddings = FactBank(4, 2)
    embeddings.write(keys[:1], torch.randn(1, 3))
    with pytest.raises(ValueError, match="integer token-id values"):
        embeddings.logit_bias(keys[:1], vocab_size=12)
    with pytest.raises(ValueError, match=r"token id \(9\) is >= vocab_size=8"):
        bank.logit_bias(keys, vocab_size=8)
    assert (FactBank(4, 2).logit_bias(keys, vocab_size=12) == 0).all()  # empty bank: no bias


def test_logit_bias_steers_a_greedy_decode_loop_to_the_stored_fact():
    torch.manual_seed(0)
    model = HydraLM(HydraConfig.from_preset("tiny", vocab_size=512, d_model=64, n_layers=3, n_heads=2)).eval()
    vocab = model.cfg.vocab_size
    answer = 123
    bank = FactBank(model.cfg.d_model, capacity=4)
    key_ids = torch.tensor([10, 11, 12])
    query = model.embed.weight[key_ids].mean(0, keepdim=True).detach()  # the caller's choice of query vector
    bank.write(query, torch.tensor([[answer]]))
    with torch.no_grad():
        out = model(key_ids[None], return_state=True)
        logits, state = out["logits"][:, -1], out["state"]
        plain = int(logits.argmax(-1))
        biased = logits + bank.logit_bias(query, vocab, strength=100.0)
        assert plain != answer and int(biased.argmax(-1)) == answer
        # An unrelated query leaves the logits untouched, so decoding continues unchanged.
        unrelated = bank.logit_bias(-query, vocab, strength=100.0)
        assert (unrelated == 0).all()
        logits_t, _ = model.step(biased.argmax(-1), state)
        assert logits_t.shape == (1, vocab)
