"""evaluate.py measures the task a checkpoint was trained on, says so, and prints where its results went."""

import json
import logging
import os

import torch
from helpers import composed
from omegaconf import OmegaConf

from hydralm import HydraConfig, HydraLM
from hydralm.data import SyntheticDataModule
from hydralm.eval.evaluate_job import evaluate, task_settings, trained_task

MODEL = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=2, swa_window=16, retrieval_chunk_size=8, dn_chunk_size=16)
# The default training run's task (conf/data/retrieval_qa.yaml); the eval defaults are 16k / 32 facts / key_len 2.
TRAINED = dict(seq_len=128, num_facts=4, num_queries=4, key_len=1, vocab=64)


def _checkpoint(path, task="retrieval_qa", task_kwargs=TRAINED, record_task=True) -> str:
    """A checkpoint laid out as train.py writes it: the module's hyper-parameters and weights, and the
    DataModule's state under its class name."""
    cfg = HydraConfig(**MODEL)
    state = SyntheticDataModule(task, dict(task_kwargs)).state_dict()
    if not record_task:  # checkpoints written before the DataModule recorded its task
        state.pop("task")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    net = HydraLM(cfg).state_dict()
    torch.save(
        {
            "hyper_parameters": {"model": cfg.to_dict(), "architecture": "hydra"},
            "state_dict": {f"net.{k}": v for k, v in net.items()},
            "SyntheticDataModule": state,
        },
        path,
    )
    return str(path)


def test_long_context_qa_measures_the_task_the_checkpoint_trained_on(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    out = tmp_path / "eval"
    overrides = ["eval=long_context_qa", f"ckpt_path={ckpt}", "eval.num_samples=2", "device=cpu"]
    with composed(out, overrides, config_name="evaluate") as cfg:
        report = evaluate(cfg)
    settings = report["settings"]
    assert (settings["seq_len"], settings["num_facts"], settings["num_queries"], settings["key_len"]) == (128, 4, 4, 1)
    assert report["trained_on"]["name"] == "retrieval_qa"
    assert json.loads((out / "long_context_qa.json").read_text())["settings"]["key_len"] == 1
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "depth 0-25 %" in printed
    assert f"results in {out}: long_context_qa.json, long_context_qa.png" in printed


def test_a_setting_given_on_the_command_line_wins_with_a_warning(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    overrides = ["eval=long_context_qa", f"ckpt_path={ckpt}", "eval.num_samples=1", "eval.seq_len=160"]
    with caplog.at_level(logging.INFO), composed(tmp_path / "eval", overrides, config_name="evaluate") as cfg:
        report = evaluate(cfg)
    assert report["settings"]["seq_len"] == 160 and report["settings"]["num_facts"] == 4
    assert "eval.seq_len=160 (command line) differs from the checkpoint's training data (seq_len=128)" in caplog.text


def test_older_checkpoints_read_the_run_config_and_other_tasks_warn(tmp_path, caplog):
    run = tmp_path / "run"
    ckpt = _checkpoint(run / "checkpoints" / "last.ckpt", record_task=False)
    assert trained_task(ckpt) is None
    (run / ".hydra").mkdir()
    data = {"_target_": "hydralm.data.SyntheticDataModule", "task": "retrieval_qa", "task_kwargs": TRAINED}
    data["task_kwargs"] = {**TRAINED, "vocab": "${model.vocab_size}"}
    OmegaConf.save({"model": {"vocab_size": 64}, "data": data}, run / ".hydra" / "config.yaml")
    assert trained_task(ckpt) == {
        "name": "retrieval_qa",
        **{k: v for k, v in TRAINED.items() if k != "vocab"},
        "vocab_size": 64,
    }
    mqar = trained_task(_checkpoint(tmp_path / "mqar.ckpt", "mqar", dict(seq_len=64, num_kv_pairs=4, vocab=64)))
    configured = dict(seq_len=16384, num_facts=32, num_queries=8, key_len=2)
    with caplog.at_level(logging.WARNING):
        settings, taken = task_settings("long_context_qa", configured, mqar, set(), 64)
    assert settings == configured and not taken
    assert "trained on mqar data, not retrieval_qa" in caplog.text
    # MQAR keeps its sweep over n_pairs, adds the trained value and drops what cannot fit the vocabulary.
    settings, _ = task_settings("mqar", dict(seq_len=512, n_pairs=[8, 16, 32, 64]), mqar, set(), 64)
    assert settings["seq_len"] == 64 and settings["n_pairs"] == [4, 8]
