"""The job behind `evaluate.py`: load a model (unless eval=claims), run the task, write a JSON report, print
a summary.

A synthetic task is measured with the settings the checkpoint was trained on (``trained_task``: recorded
by the DataModule in every checkpoint; older checkpoints: the run's ``.hydra/config.yaml``), unless a
setting is given on the command line, which wins with a warning when it differs. Without this a checkpoint
of the default run (128 tokens, 4 facts, key_len 1) would be scored on the eval defaults (16k tokens,
32 facts, key_len 2), a task it never saw, and report chance.
"""

import json
import logging
import os
import re
import sys
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hydralm.eval import tasks

log = logging.getLogger(__name__)

TASKS = ("long_context_qa", "mqar", "needle", "perplexity", "mtp_acceptance", "claims")
# Eval task -> the training data it measures, and the settings that define that task (taken from the
# checkpoint). Sweep axes (mqar n_pairs, needle lengths and depths) stay as configured.
TRAINED_AS = {
    "long_context_qa": "retrieval_qa",
    "mqar": "mqar",
    "needle": "needle",
    "perplexity": "text",
    "mtp_acceptance": "text",
}
TASK_SETTINGS = {"long_context_qa": ("seq_len", "num_facts", "num_queries", "key_len"), "mqar": ("seq_len",)}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available")
    return torch.device(name)


# -- what the checkpoint was trained on ------------------------------------------------------------
def _from_run_config(ckpt_path: str) -> Optional[Dict[str, Any]]:
    """The data section of ``<run>/.hydra/config.yaml`` for ``<run>/checkpoints/<name>.ckpt``."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), os.pardir, ".hydra", "config.yaml")
    if not os.path.isfile(path):
        return None
    run_cfg = OmegaConf.load(path)
    data = run_cfg.get("data") or {}
    target = str(data.get("_target_", ""))
    if target.endswith("TextDataModule"):
        return {"name": "text"}
    if not target.endswith("SyntheticDataModule"):
        return None
    try:  # task_kwargs.vocab is ${model.vocab_size}: resolvable inside that file
        kwargs = OmegaConf.to_container(run_cfg.data.task_kwargs, resolve=True) or {}
    except Exception:  # an interpolation only that run could resolve
        return None
    vocab = kwargs.pop("vocab", None)
    return {"name": str(data.get("task")), **kwargs, **({"vocab_size": vocab} if isinstance(vocab, int) else {})}


def trained_task(ckpt_path: str) -> Optional[Dict[str, Any]]:
    """``{"name": "retrieval_qa", "seq_len": 128, ...}``, ``{"name": "text"}``, or None when unknown
    (an exported folder, or a checkpoint without its run folder)."""
    if os.path.isdir(ckpt_path):
        return None
    from hydralm.export import read_checkpoint

    checkpoint = read_checkpoint(ckpt_path, mmap=True)
    task = (checkpoint.get("SyntheticDataModule") or {}).get("task")
    if isinstance(task, dict):
        return dict(task)
    if "TextDataModule" in checkpoint:
        return {"name": "text"}
    return _from_run_config(ckpt_path)


def command_line_keys() -> Set[str]:
    """Keys set on this run's command line (``eval.seq_len=...`` -> ``eval.seq_len``); empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = set()
    for override in HydraConfig.get().overrides.task:
        match = re.match(r"^[+~]*([^=]+)=", override)
        if match:
            keys.add(match.group(1))
    return keys


def _mqar_fits(seq_len: int, pairs: int, vocab_size: int) -> bool:
    from hydralm.data import MQAR

    try:
        MQAR(seq_len=seq_len, num_kv_pairs=pairs, vocab=vocab_size)
    except ValueError:
        return False
    return True


def task_settings(
    name: str, configured: Dict[str, Any], trained: Optional[Dict[str, Any]], given: Set[str], vocab_size: int
) -> Tuple[Dict[str, Any], List[str]]:
    """The settings to run ``name`` with, and what was taken from the checkpoint (logged); warnings are logged
    here. ``configured``: the eval config's values; ``given``: the keys set on the command line."""
    settings, taken = dict(configured), []
    expected = TRAINED_AS.get(name)
    if trained is None:
        log.warning(
            "the checkpoint does not record what it was trained on (an exported folder, or a .ckpt moved out of "
            "its run folder): eval=%s runs with the configured settings %s",
            name,
            {k: settings[k] for k in TASK_SETTINGS.get(name, ())},
        )
        trained = {"name": expected}
    elif trained["name"] != expected:
        log.warning(
            "the checkpoint was trained on %s data, not %s: eval=%s measures a task it never saw",
            trained["name"],
            expected,
            name,
        )
        trained = {"name": expected}
    for key in TASK_SETTINGS.get(name, ()):
        if key not in trained:
            continue
        if f"eval.{key}" not in given:
            settings[key] = trained[key]
            taken.append(key)
        elif settings[key] != trained[key]:
            log.warning(
                "eval.%s=%s (command line) differs from the checkpoint's training data (%s=%s)",
                key,
                settings[key],
                key,
                trained[key],
            )
    if trained.get("vocab_size") not in (None, vocab_size):
        log.warning(
            "the checkpoint trained on a synthetic vocabulary of %s tokens but the tasks lay out the model's "
            "vocab_size=%s: token roles differ from training",
            trained["vocab_size"],
            vocab_size,
        )
    if name == "mqar" and "eval.n_pairs" not in given:
        wanted = sorted({*settings["n_pairs"], *([trained["num_kv_pairs"]] if "num_kv_pairs" in trained else [])})
        fitting = [p for p in wanted if _mqar_fits(settings["seq_len"], p, vocab_size)]
        if not fitting:
            raise ValueError(
                f"eval.n_pairs={wanted}: none fits seq_len={settings['seq_len']} with the model's "
                f"vocab_size={vocab_size}; set eval.n_pairs=[...] and eval.seq_len"
            )
        if fitting != wanted:
            log.info(
                "eval.n_pairs: %s do not fit seq_len=%s with vocab_size=%s; measuring %s",
                sorted(set(wanted) - set(fitting)),
                settings["seq_len"],
                vocab_size,
                fitting,
            )
        settings["n_pairs"] = fitting
        if "num_kv_pairs" in trained:
            taken.append("n_pairs")
    if taken:
        log.info(
            "eval settings from the checkpoint's training data: %s (set eval.<key>=... to choose)",
            ", ".join(f"{k}={settings[k]}" for k in taken),
        )
    return settings, taken


# -- the job ---------------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> Dict:
    name = cfg.eval.name
    if name not in TASKS:
        raise ValueError(f"eval.name={name!r} is unknown; allowed: {list(TASKS)}")
    out_dir = cfg.paths.output_dir
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if name == "claims":
        return _claims(cfg, out_dir)
    if cfg.ckpt_path is None:
        raise ValueError(f"eval={name} needs ckpt_path=<.ckpt file or exported folder>")
    from hydralm.export import load_model

    ckpt_path = str(cfg.ckpt_path)
    model = load_model(ckpt_path).to(_device(cfg.device)).eval()
    trained = trained_task(ckpt_path)
    configured = {
        k: v
        for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items()
        if k not in ("name", "data", "max_batches")
    }
    settings, taken = task_settings(name, configured, trained, command_line_keys(), model.cfg.vocab_size)
    if name == "perplexity":
        report = tasks.perplexity(model, instantiate(cfg.eval.data), cfg.eval.max_batches)
    elif name == "mtp_acceptance":
        from hydralm.eval.mtp_acceptance import mtp_acceptance

        report = mtp_acceptance(model, instantiate(cfg.eval.data), cfg.eval.max_batches, **settings)
    else:
        report = getattr(tasks, name)(model, out_dir, seed=cfg.seed, **settings)
    report = {
        "task": name,
        "ckpt_path": ckpt_path,
        "model": model.cfg.summary(),
        "trained_on": trained,
        "settings_from_checkpoint": taken,
        **report,
    }
    if name != "perplexity":
        report["settings"] = {**report.get("settings", {}), **settings}  # every setting used, key_len included
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(summary(report, out_dir))
    return report


# -- what the user reads ---------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_rows(report: Dict) -> List[Tuple[str, str, str]]:
    """(what, value, note) rows of a task report."""
    name = report["task"]
    if name == "long_context_qa":
        rows = [("accuracy", _fmt(report["accuracy"]), f"{report['queries']} queries")]
        for bucket, cell in report["by_depth"].items():
            rows.append((f"  depth {bucket} %", _fmt(cell["accuracy"]), f"{cell['queries']} queries"))
        return rows
    if name == "mqar":
        return [(f"accuracy, {pairs} pairs", _fmt(acc), "") for pairs, acc in report["accuracy_by_pairs"].items()]
    if name == "needle":
        return [
            (f"accuracy, depth {depth}", "  ".join(_fmt(a) for a in row), f"lengths {report['lengths']}")
            for depth, row in zip(report["depths"], report["accuracy"])
        ]
    if name == "perplexity":
        return [(k, _fmt(report[k]), "") for k in ("loss", "perplexity", "tokens")]
    if name == "mtp_acceptance":
        forced, decoding = report["teacher_forced"], report["decoding"]
        rows = []
        for i in range(report["mtp_depth"]):
            rows.append((f"depth {i + 1} greedy match", _fmt(forced["greedy_match"][i]), "teacher-forced"))
            rows.append((f"depth {i + 1} sampled acceptance", _fmt(forced["sampled_acceptance"][i]), "1 - TV(p, q)"))
            rows.append((f"depth {i + 1} decoding acceptance", _fmt(decoding["acceptance_by_depth"][i]), "greedy"))
        note = f"{decoding['prompts']} prompts x {decoding['new_tokens']} tokens"
        return rows + [("tokens per round", _fmt(decoding["tokens_per_round"]), note)]
    return [(k, _fmt(v), "") for k, v in report.items() if isinstance(v, (int, float))]


def summary(report: Dict, out_dir: str) -> str:
    settings = report.get("settings") or {}
    lines = [
        f"{report['task']}: {report['ckpt_path']}",
        f"  model     {report['model']}",
        f"  trained   {_settings_text(report.get('trained_on')) if report.get('trained_on') else 'unknown'}",
    ]
    if settings:
        lines.append(f"  settings  {_settings_text(settings)}")
    rows = summary_rows(report)
    width = max(len(r[0]) for r in rows) if rows else 0
    lines += [f"  {what:<{width}}  {value}  {note}".rstrip() for what, value, note in rows]
    written = sorted(f for f in os.listdir(out_dir) if f.startswith(report["task"] + "."))
    lines.append(f"results in {os.path.abspath(out_dir)}: {', '.join(written)}")
    return "\n".join(lines)


def _settings_text(settings: Dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def _claims(cfg: DictConfig, out_dir: str) -> Dict:
    from hydralm.eval.claims import run_claims
    from hydralm.eval.report import publish, write_reports
    from hydralm.training.run_info import git_sha

    only = list(cfg.eval.only) if cfg.eval.only else None
    command = "python " + " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    sha = git_sha(cfg.paths.root_dir)
    minutes = cfg.eval.get("call_minutes")
    results = run_claims(
        cfg.eval.budget,
        cfg.eval.get("workdir") or os.path.join(out_dir, "claim_runs"),
        only,
        on_result=lambda so_far: write_reports(so_far, out_dir, command, sha),
        call_seconds=None if minutes is None else 60.0 * float(minutes),
        models=list(cfg.eval.models) if cfg.eval.get("models") else None,
        seed=cfg.eval.get("seed"),
    )
    payload = write_reports(results, out_dir, command, sha)
    if cfg.eval.publish:
        publish(payload, cfg.paths.root_dir)
    for r in results:
        print(f"{r.id:4s} {str(r.passed):5s} {r.values}")
    print(f"results in {os.path.abspath(out_dir)}: results.json, RESULTS.md")
    return payload
