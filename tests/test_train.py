"""The training framework end to end: configs, train(), resume, DDP simulation, bad input."""

import csv
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CONF, FAST, ROOT, composed, run_script
from omegaconf import OmegaConf

from hydralm import HydraConfig
from hydralm.training.pipeline import train

EXPERIMENTS = sorted(Path(CONF, "experiment").glob("*.yaml"))


def _text_file(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(60)))
    return str(path)


def test_default_config_composes_and_matches_the_model_presets(tmp_path):
    with composed(tmp_path, []) as cfg:
        assert cfg.data.task == "retrieval_qa" and cfg.trainer.accelerator == "cpu"
        assert cfg.data.task_kwargs.vocab == cfg.model.vocab_size
    for name in ("tiny", "small", "160m"):
        yaml_fields = OmegaConf.to_container(OmegaConf.load(Path(CONF, "model", f"{name}.yaml")))
        assert HydraConfig(**yaml_fields) == HydraConfig.from_preset(name), f"conf/model/{name}.yaml drifted"


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_fast_dev_run_for_every_experiment(tmp_path, experiment):
    overrides = [f"experiment={experiment.stem}", "debug=fdr", "trainer=cpu", "trainer.precision=32-true"]
    overrides += [o for o in FAST if not o.startswith("data.")] + ["data.batch_size=2"]
    if "text" in experiment.stem:
        overrides += [f"data.data_files={_text_file(tmp_path)}", "data.seq_len=64"]
    else:  # GPU-sized experiments shrink to CPU scale; the point is that they compose and run
        overrides += ["data.task_kwargs.seq_len=256", "data.num_workers=0"]
        if "mqar" in experiment.stem:
            overrides += ["data.task_kwargs.num_kv_pairs=16"]
        else:
            overrides += ["data.task_kwargs.num_facts=4", "data.task_kwargs.num_queries=2"]
    with composed(tmp_path, overrides) as cfg:
        metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert "train/loss" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_train_writes_artifacts_and_checkpoints_load_with_weights_only(tmp_path, caplog):
    with (
        caplog.at_level(logging.INFO),
        composed(tmp_path, FAST + ["test=true", "progress=text", "model.retrieval_routing_loss=0.5"]) as cfg,
    ):
        metrics, objects = train(cfg)
    assert {"val/loss", "val/acc", "test/acc", "test/acc_depth_0_25"} <= set(metrics)
    # Plain-text progress instead of a bar, validation metrics in the log, and a closing summary.
    assert objects["trainer"].progress_bar_callback is None
    assert re.search(
        r"step 2/4 \| loss [\d.]+ \| acc [\d.]+ \| [\d.]+k? tok/s \| elapsed 0:\d\d:\d\d \| ETA ", caplog.text
    )
    assert re.search(r"validation at step 2: val/acc [\d.]+ \| .*val/loss [\d.]+", caplog.text)
    assert f"run folder: {tmp_path}" in caplog.text and "best checkpoint: " in caplog.text
    assert f"last checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert re.search(r"final metrics: test/acc [\d.]+ .*val/loss", caplog.text)
    # FAST is [deltanet, retrieval, swa]: the retrieval layer (block 1) reports its routing recall, and the
    # routing loss (on here) reaches the training loss
    assert 0.0 <= metrics["val/routing_recall/layer1"] <= 1.0 and "val/routing_recall_far/layer1" in metrics
    assert metrics["train/routing_loss"] > 0
    assert (tmp_path / "run_info.json").exists() and (tmp_path / "csv" / "metrics.csv").exists()
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 4
    assert isinstance(checkpoint["hyper_parameters"]["model"], dict)


def test_muon_hybrid_trains(tmp_path):
    with composed(tmp_path, FAST + ["optimizer=muon", "test=false"]) as cfg:
        metrics, objects = train(cfg)
    optimizer = objects["trainer"].optimizers[0]
    assert type(optimizer).__name__ == "MuonAdamW" and len(optimizer.muon.param_groups[0]["params"]) > 0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def _losses(csv_path: Path) -> dict:
    with open(csv_path) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path):
    """N steps, kill -9, resume for M more == N + M uninterrupted, loss for loss (CPU, exact)."""
    N, M = 6, 6
    common = [o for o in FAST if not o.startswith("trainer.max_steps")] + [
        f"trainer.max_steps={N + M}",
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=0",
        "+callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.filename='step{step}'",
        "test=false",
        "optimized_metric=null",
    ]
    full = tmp_path / "full"
    done = run_script(["train.py", *common, f"hydra.run.dir={full}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "train.py", *common, f"hydra.run.dir={killed}"],
        cwd=str(ROOT),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = killed / "checkpoints" / f"step{N}.ckpt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run died before its step-N checkpoint"

    resumed = tmp_path / "resumed"
    again = run_script(["train.py", *common, f"hydra.run.dir={resumed}", f"ckpt_path={checkpoint}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    reference, continued = _losses(full / "csv" / "metrics.csv"), _losses(resumed / "csv" / "metrics.csv")
    assert sorted(continued) == list(range(N, N + M))
    for step in continued:
        assert continued[step] == reference[step], f"step {step}: {continued[step]} != {reference[step]}"


def test_ddp_sim_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    base = [o for o in FAST if not o.startswith("data.batch_size")] + [
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=0",
        "callbacks=none",
        "~logger",
        "test=false",
        "optimized_metric=null",
    ]
    with composed(tmp_path / "one", base + ["data.batch_size=4"]) as cfg:
        _, one = train(cfg)
    with composed(tmp_path / "two", base + ["data.batch_size=2", "trainer=ddp_sim"]) as cfg:
        _, two = train(cfg)
    assert two["trainer"].world_size == 2
    for (name, a), b in zip(one["model"].named_parameters(), two["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"parameter {name} differs after DDP")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.retrieval_top_k=0", "retrieval_top_k=0"),
        ("model.d_model=-8", "d_model=-8"),
        ("data.task_kwargs.vocab=600", "model.vocab_size=64"),
        ("data.task_kwargs.seq_len=10", "seq_len=10"),
        ("ckpt_path=/nonexistent/x.ckpt", "ckpt_path"),
        ("optimizer.lr=-1", "optimizer.lr=-1 is invalid"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas=[0.9, 1.5] is invalid"),
        ("trainer.max_steps=0", "trainer.max_steps=0 is invalid"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is invalid"),
    ],
)
def test_bad_input_fails_before_training_with_one_clear_message(tmp_path, override, needle):
    with composed(tmp_path, FAST + [override]) as cfg:
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            train(cfg)
    assert needle in str(err.value)


def test_a_bad_value_fails_in_one_line_and_leaves_no_run_folder(tmp_path):
    result = run_script(["train.py", "optimizer.lr=-1"], cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "ValueError: optimizer.lr=-1 is invalid: expected a number > 0" in result.stderr, result.stderr[-3000:]
    runs = tmp_path / "logs" / "train" / "runs"
    assert not runs.exists() or os.listdir(runs) == [], "a run that wrote nothing must not leave its folder"


def test_optuna_sweep_fails_up_front_when_its_metric_is_never_logged(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    overrides = FAST + ["hparams_search=optuna_lr_topk", "trainer.limit_val_batches=0"]
    with composed(tmp_path, overrides) as cfg:
        with pytest.raises(ValueError) as err:
            train(cfg)
    assert "optimized_metric='val/acc' will never be logged: validation never runs" in str(err.value)
    text = ["data=text", f"data.data_files={_text_file(tmp_path)}", "data.seq_len=64", "model.vocab_size=259"]
    with composed(tmp_path, FAST[:7] + text + ["hparams_search=optuna_lr_topk", "print_config=false"]) as cfg:
        with pytest.raises(ValueError, match="this data logs no answer accuracy"):
            train(cfg)


def test_bad_corpus_path_and_unknown_group_option(tmp_path):
    with composed(
        tmp_path, FAST[:7] + ["data=text", f"data.data_files={tmp_path}/missing/*.txt", "model.vocab_size=259"]
    ) as cfg:
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            train(cfg)
    assert "missing" in str(err.value)
    result = run_script(["train.py", "model=huge", "trainer.max_steps=1"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and "model/huge" in result.stderr and "tiny" in result.stderr


def test_non_finite_loss_stops_with_a_message_and_keeps_the_good_checkpoint(tmp_path):
    from hydralm.training.lit_module import HydraLMModule

    with composed(tmp_path, FAST + ["nonfinite=stop", "test=false"]) as cfg:
        train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    module = HydraLMModule.load_from_checkpoint(last, weights_only=True)
    with torch.no_grad():
        next(module.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        module.on_save_checkpoint({})
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long)}
    with pytest.raises(FloatingPointError, match="non-finite training step"):
        module.training_step(batch, 0)
    assert last.read_bytes() == before


@pytest.mark.slow
def test_multirun_and_optuna_sweep(tmp_path):
    fast = [o for o in FAST if "max_steps" not in o] + ["trainer.max_steps=2", "test=false"]
    result = run_script(["train.py", "-m", *fast, "seed=1,2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(glob.glob(str(tmp_path / "logs/train/multiruns/*/*/run_info.json"))) == 2
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_script(
        ["train.py", "-m", "hparams_search=optuna_lr_topk", "hydra.sweeper.n_trials=2", *fast], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best parameters" in result.stdout + result.stderr or glob.glob(
        str(tmp_path / "logs/**/optimization_results.yaml"), recursive=True
    )


def test_ddp_sim_ranks_train_on_distinct_rows_and_resume(tmp_path):
    """2 gloo processes: no row is seen by both ranks at a step; resuming a 2-process run from its step-2
    checkpoint ends with the same weights as the uninterrupted run."""
    from hydralm.training.callbacks import duplicates_across_ranks

    base = [o for o in FAST if not o.startswith(("trainer.max_steps", "data.batch_size"))] + [
        "trainer=ddp_sim",
        "data.batch_size=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=0",
        "test=false",
        "optimized_metric=null",
        "~logger",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "+callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.filename='step{step}'",
    ]
    with composed(
        tmp_path / "full", base + ["debug=ddp_ids", "trainer.max_steps=4", "trainer.val_check_interval=1000"]
    ) as cfg:
        _, full = train(cfg)
    ids_dir = tmp_path / "full" / "sample_ids"
    assert sorted(os.listdir(ids_dir)) == ["sample_ids_rank0.jsonl", "sample_ids_rank1.jsonl"]
    assert duplicates_across_ranks(str(ids_dir)) == {}
    with composed(
        tmp_path / "resumed", base + [f"ckpt_path={tmp_path / 'full' / 'checkpoints' / 'step2.ckpt'}"]
    ) as cfg:
        _, resumed = train(cfg)
    for (name, a), b in zip(full["model"].named_parameters(), resumed["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{name} differs after a ddp_sim resume")
