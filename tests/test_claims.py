"""The claim suite at the smoke budget: correctness claims pass, every claim reports a measured value,
and the generated RESULTS.md lists them all."""

import json

import pytest
from helpers import composed
from omegaconf import OmegaConf

from hydralm.eval.claims import CLAIMS, run_claims
from hydralm.eval.report import write_reports


def test_smoke_claim_suite_measures_every_claim_and_c1_to_c3_pass(tmp_path, monkeypatch):
    from hydralm.eval import claims

    # The trained claims with a few steps each: what they learn at the smoke budget is not this test's concern
    # (their own tests below cover training, resuming and scoring), only that every claim measures and reports.
    smoke = claims.BUDGETS["smoke"]
    monkeypatch.setitem(smoke, "c10", {**smoke["c10"], "steps": 6, "curriculum": [dict(until_step=3, seq_len=32)]})
    monkeypatch.setitem(smoke, "c7", {**smoke["c7"], "steps": 6})
    monkeypatch.setitem(smoke, "c6", {**smoke["c6"], "steps": 10})
    claims._c10_cache.clear()
    results = run_claims("smoke", str(tmp_path / "runs"))
    by_id = {r.id: r for r in results}
    assert list(by_id) == list(CLAIMS)
    for claim_id in ("C1", "C2", "C3"):
        assert by_id[claim_id].passed is True, by_id[claim_id]
    # C8 answers the same needles with every C10 model: retrieval's verdict, the others beside it
    assert {"accuracy", "accuracy_no_retrieval"} <= set(by_id["C8"].values), by_id["C8"]
    for r in results:
        assert r.values, f"{r.id} has no measured value"
        assert r.statement and r.threshold and r.budget == "smoke"
    write_reports(results, str(tmp_path), "python evaluate.py eval=claims eval.budget=smoke", "test")
    table = (tmp_path / "RESULTS.md").read_text()
    assert all(f"| {claim_id} |" in table for claim_id in CLAIMS)
    assert json.loads((tmp_path / "results.json").read_text())["claims"][0]["id"] == "C1"
    # C10's models by depth, one figure beside the table
    assert "(RESULTS-C10-smoke.png)" in table and (tmp_path / "RESULTS-C10-smoke.png").stat().st_size > 0


def test_a_claim_the_call_limit_stops_says_so_and_the_next_call_continues_it(tmp_path, monkeypatch):
    """eval.call_minutes / eval.workdir: a trained claim stopped by the call's time limit reports its progress
    (no verdict), keeps its checkpoint, and the next call with the same workdir resumes it to the end."""
    from hydralm.eval import claims

    monkeypatch.setitem(claims.BUDGETS["smoke"], "c7", {**claims.BUDGETS["smoke"]["c7"], "steps": 12})
    workdir = str(tmp_path / "runs")
    (first,) = run_claims("smoke", workdir, only=["C7"], call_seconds=0.0)
    assert first.passed is None and "training in progress" in first.note, first
    assert first.values["model"]["train_steps"] < 12
    run = tmp_path / "runs" / "c7"
    first_seconds = json.loads((run / "metrics.json").read_text())["seconds"]
    (second,) = run_claims("smoke", workdir, only=["C7"])
    assert second.passed in (True, False) and second.values["train_steps"] == 12, second
    assert second.values["train_seconds"] > first_seconds  # both calls' training time
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["finished"] is True
    (third,) = run_claims("smoke", workdir, only=["C7"])  # finished: only loaded, its time and metrics kept
    assert third.values["train_seconds"] >= second.values["train_seconds"]
    assert json.loads((run / "metrics.json").read_text())["metrics"] == summary["metrics"]
    assert (run / "csv" / "metrics.csv").is_file() and (run / "csv" / "call2" / "metrics.csv").is_file()  # both kept


def test_eval_models_trains_only_the_named_runs_and_a_later_call_scores_them_all(tmp_path, monkeypatch):
    """eval.models: processes over one workdir (one per GPU) each train their own of C10's models; a run left to
    another process is named as such, and a later call without eval.models trains only what is missing."""
    from hydralm.eval import claims

    c10 = {**claims.BUDGETS["smoke"]["c10"], "steps": 4, "curriculum": [dict(until_step=2, seq_len=32)]}
    monkeypatch.setitem(claims.BUDGETS["smoke"], "c10", c10)
    claims._c10_cache.clear()
    workdir = str(tmp_path / "runs")
    with pytest.raises(ValueError, match=r"eval.models=\['c10_noretrieval'\] unknown"):
        run_claims("smoke", workdir, only=["C10"], models=["c10_noretrieval"])
    (first,) = run_claims("smoke", workdir, only=["C10"], models=["c10_no_retrieval"])
    assert first.passed is None and "retrieval, dense: left to another process" in first.note, first
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["c10_no_retrieval"]
    trained = tmp_path / "runs" / "c10_no_retrieval" / "metrics.json"
    before = trained.stat().st_mtime_ns
    claims._c10_cache.clear()
    (second,) = run_claims("smoke", workdir, only=["C10"])
    assert second.passed in (True, False) and second.values["no_retrieval"]["train_steps"] == 4, second
    assert json.loads(trained.read_text())["finished"] is True and trained.stat().st_mtime_ns > before  # loaded
    assert second.values["retrieval"]["train_steps"] == 4


def test_c6_on_real_text_sweeps_each_optimizers_learning_rate_and_resumes_across_calls(tmp_path, monkeypatch):
    """The full budget's C6 form at toy size: the standard library's sources as the corpus, each optimizer at the
    same learning rates (its lowest final val loss picked); a call whose time is up trains nothing and says so,
    the next one finishes every run, and a finished run is read back, not trained again."""
    from hydralm.eval import claims

    c6 = dict(
        model="tiny", model_overrides={**claims.TINY, "vocab_size": 259}, data="text", corpus_chars=60_000,
        data_overrides=dict(seq_len=32), batch_size=4, steps=3, lrs=[1e-3, 3e-3],
    )  # fmt: skip
    monkeypatch.setitem(claims.BUDGETS["smoke"], "c6", c6)
    workdir = str(tmp_path / "runs")
    (first,) = run_claims("smoke", workdir, only=["C6"], call_seconds=0.0)
    assert first.passed is None and len(first.values["unfinished"]) == 4, first
    (second,) = run_claims("smoke", workdir, only=["C6"])
    assert set(second.values["lr"]) == {"adamw", "muon"} and set(second.values["lr"].values()) <= {1e-3, 3e-3}
    assert second.values["seconds_adamw"] is not None, second
    assert (tmp_path / "runs" / "c6_corpus.txt").stat().st_size >= 60_000
    summary = tmp_path / "runs" / "c6_muon_lr0.003" / "metrics.json"
    before = summary.stat().st_mtime_ns
    (third,) = run_claims("smoke", workdir, only=["C6"])
    assert third.values == second.values and summary.stat().st_mtime_ns == before  # read back, not retrained


def test_a_budget_entrys_learning_rate_reaches_the_training_run():
    """C7's full budget trains at lr 1e-3 (docs/claims.md); an entry without `lr` keeps the optimizer config's."""
    from hydralm.eval import claims

    assert "optimizer.lr=0.001" in claims._run_overrides(claims.BUDGETS["full"]["c7"])
    assert not any(o.startswith("optimizer.lr") for o in claims._run_overrides(claims.BUDGETS["full"]["c10"]))


@pytest.mark.parametrize("claim, experiment", [("c7", "mqar_8k_gpu"), ("c10", "retrieval_qa_16k_gpu")])
def test_the_gpu_experiment_is_the_claims_full_recipe(tmp_path, claim, experiment):
    """`python train.py experiment=<name>` trains what the full claim budget trains: model, task, batch, steps,
    learning rate and curriculum."""
    from hydralm.eval.claims import BUDGETS

    b = BUDGETS["full"][claim]
    with composed(tmp_path, []) as cfg:
        default_lr = cfg.optimizer.lr
    with composed(tmp_path, [f"experiment={experiment}"]) as cfg:
        for field, value in b["model_overrides"].items():
            assert cfg.model[field] == value, field
        task = {"seq_len": b["seq_len"]} | (
            {"num_kv_pairs": b["pairs"]}
            if claim == "c7"
            else {"num_facts": b["facts"], "num_queries": b["queries"], "key_len": b["key_len"]}
        )
        assert {k: cfg.data.task_kwargs[k] for k in task} == task
        assert cfg.data.batch_size == b["batch_size"] and cfg.trainer.max_steps == b["steps"]
        assert cfg.optimizer.lr == b.get("lr", default_lr)  # an entry without lr: the optimizer config's
        assert OmegaConf.to_container(cfg.data.curriculum) == b["curriculum"]


def test_c10_says_which_condition_failed_when_the_model_without_retrieval_answers_as_well(monkeypatch):
    """C10 needs both: retrieval >= 0.90 and a lift of the 0-25 bucket over the model without retrieval. A model
    without retrieval that answers as well fails the claim, and the note says so with both figures."""
    from hydralm.eval import claims

    def scored(accuracy, early):
        by_depth = {k: {"accuracy": early if k == "0-25" else accuracy} for k in ("0-25", "25-50", "50-75", "75-100")}
        return {
            "accuracy": accuracy,
            "ci95": [accuracy - 0.02, min(1.0, accuracy + 0.02)],
            "chance": 1 / 34,
            "by_depth": by_depth,
            "wrong": {},
            "train_steps": 10,
            "train_seconds": 1.0,
        }

    results = {"retrieval": scored(0.99, 0.98), "no_retrieval": scored(1.0, 1.0)}
    monkeypatch.setattr(claims, "_c10_models", lambda budget, runs: {"runs": {}, "results": results})
    result = claims.claim_c10("full", None)
    assert result.passed is False
    assert "0-25 bucket not lifted: 98.0% with retrieval, 100.0% without" in result.note, result.note
    results["no_retrieval"] = scored(0.5, 0.2)
    result = claims.claim_c10("full", None)
    assert result.passed is True and "not lifted" not in result.note, result


def test_eval_seed_trains_the_claims_models_with_that_seed_and_never_continues_another_seeds_run(tmp_path, monkeypatch):
    """eval.seed: the trained claims' models train with it (their summary and the claim's settings say so); a
    workdir holding another seed's run refuses to continue it, naming both seeds."""
    from hydralm.eval import claims

    monkeypatch.setitem(claims.BUDGETS["smoke"], "c7", {**claims.BUDGETS["smoke"]["c7"], "steps": 2})
    workdir = str(tmp_path / "runs")
    (result,) = run_claims("smoke", workdir, only=["C7"], seed=7)
    assert result.settings["seed"] == 7 and result.values["train_steps"] == 2, result
    assert json.loads((tmp_path / "runs" / "c7" / "metrics.json").read_text())["seed"] == 7
    with pytest.raises(ValueError, match=r"trained with seed=7; seed=8 cannot continue it"):
        run_claims("smoke", workdir, only=["C7"], seed=8)
    (again,) = run_claims("smoke", workdir, only=["C7"], seed=7)  # the same seed only loads the finished run
    assert again.values["train_steps"] == 2
