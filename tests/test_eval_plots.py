"""Accuracy by depth, read honestly: Wilson intervals, counts, chance, and figures that draw them."""

import pytest
import torch

from hydralm import HydraConfig, HydraLM
from hydralm.data import RetrievalQA
from hydralm.eval.plots import accuracy_and_routing_chart, depth_bar_chart
from hydralm.eval.scoring import task_accuracy, wilson_interval, wrong_answer_kinds
from hydralm.eval.tasks import long_context_qa


def test_wilson_interval_matches_known_values_and_is_exact_at_the_ends():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_task_accuracy_reports_counts_intervals_and_chance():
    torch.manual_seed(0)
    cfg = HydraConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, layer_types=["deltanet", "swa"], swa_window=16)
    task = RetrievalQA(seq_len=64, num_facts=4, num_queries=2, key_len=1, vocab=64)
    result = task_accuracy(HydraLM(cfg).eval(), task, 8, batch_size=4, chunk_size=64)
    assert result["chance"] == 1 / 14  # 64-token vocabulary: 14 value tokens
    assert result["queries"] == 16 and result["accuracy"] == result["correct"] / 16
    assert tuple(result["ci95"]) == wilson_interval(result["correct"], 16)
    assert sum(b["queries"] for b in result["by_depth"].values()) == 16
    wrong = result["wrong"]
    assert wrong["answers"] == 16 - result["correct"]
    assert wrong["answers"] == 0 or sum(wrong[k] for k in wrong if k != "answers") == pytest.approx(1.0)


def test_wrong_answers_are_told_apart_as_misread_guessed_or_no_value():
    """Values are ids 10-19. Row 0 answers right, then with 12, which occurs before its query (another fact's
    value: misread); row 1 with 15, a value not in the context, then with 3, not a value."""
    ids = torch.tensor([[1, 12, 2, 11, 0, 0], [1, 13, 2, 14, 0, 0]])
    positions = torch.tensor([[3, 5], [3, 5]])
    answers = torch.tensor([[11, 11], [14, 13]])
    predicted = torch.tensor([[11, 12], [15, 3]])
    kinds = wrong_answer_kinds(ids, positions, predicted, answers, (10, 20))
    assert kinds == {"another_value_in_context": 1, "value_not_in_context": 1, "not_a_value": 1}
    # a value occurring only after the query is not one the model could have read
    late = wrong_answer_kinds(ids, torch.tensor([[0, 0]]).expand(2, 2), predicted, answers, (10, 20))
    assert late["another_value_in_context"] == 0 and late["value_not_in_context"] == 2


def test_figures_draw_perfect_empty_and_routing_buckets(tmp_path):
    by_depth = {
        "0-25": {"accuracy": 1.0, "queries": 40, "correct": 40, "ci95": list(wilson_interval(40, 40))},
        "25-50": {"accuracy": 0.5, "queries": 10, "correct": 5, "ci95": list(wilson_interval(5, 10))},
        "50-75": {"accuracy": None, "queries": 0, "correct": 0, "ci95": [0.0, 1.0]},
        "75-100": {"accuracy": 0.0, "queries": 3, "correct": 0, "ci95": list(wilson_interval(0, 3))},
    }
    bucket = {"recall": 1.0, "recall_far": 0.5, "chance_far": 0.25, "queries": 4, "far_queries": 2}
    empty = {"recall": None, "recall_far": None, "chance_far": None, "queries": 0, "far_queries": 0}
    routing = {"layer1": {"by_depth": {"0-25": bucket, "25-50": bucket, "50-75": empty, "75-100": bucket}}}
    depth_bar_chart(by_depth, "title", str(tmp_path / "a.png"), chance=1 / 14)
    accuracy_and_routing_chart(by_depth, routing, "title", str(tmp_path / "b.png"), chance=1 / 14)
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_long_context_qa_names_the_checkpoint_and_reports_routing(tmp_path):
    torch.manual_seed(0)
    cfg = HydraConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        layer_types=["deltanet", "retrieval"],
        retrieval_chunk_size=8,
        retrieval_top_k=2,
        dn_chunk_size=16,
    )
    result = long_context_qa(
        HydraLM(cfg).eval(),
        str(tmp_path),
        seq_len=96,
        num_facts=4,
        num_queries=2,
        key_len=1,
        num_samples=4,
        chunk_size=96,
        checkpoint="/runs/x/checkpoints/last.ckpt",
    )
    assert set(result["routing_recall"]) == {"layer1"} and result["figure"].endswith("long_context_qa.png")
    assert (tmp_path / "long_context_qa.png").stat().st_size > 0
