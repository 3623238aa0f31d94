"""The job behind `evaluate.py`: load a model (unless eval=claims), run the task, write a JSON report."""

import json
import os
import sys
from typing import Dict

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hydralm.eval import tasks

TASKS = ("long_context_qa", "mqar", "needle", "perplexity", "claims")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available")
    return torch.device(name)


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

    model = load_model(cfg.ckpt_path).to(_device(cfg.device)).eval()
    settings = {
        k: v
        for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items()
        if k not in ("name", "data", "max_batches")
    }
    if name == "perplexity":
        report = tasks.perplexity(model, instantiate(cfg.eval.data), cfg.eval.max_batches)
    else:
        report = getattr(tasks, name)(model, out_dir, seed=cfg.seed, **settings)
    report = {"task": name, "ckpt_path": str(cfg.ckpt_path), "model": model.cfg.summary(), **report}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    return report


def _claims(cfg: DictConfig, out_dir: str) -> Dict:
    from hydralm.eval.claims import run_claims
    from hydralm.eval.report import publish, write_reports
    from hydralm.training.run_info import git_sha

    only = list(cfg.eval.only) if cfg.eval.only else None
    command = "python " + " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    sha = git_sha(cfg.paths.root_dir)
    results = run_claims(
        cfg.eval.budget,
        os.path.join(out_dir, "claim_runs"),
        only,
        on_result=lambda so_far: write_reports(so_far, out_dir, command, sha),
    )
    payload = write_reports(results, out_dir, command, sha)
    if cfg.eval.publish:
        publish(payload, cfg.paths.root_dir)
    for r in results:
        print(f"{r.id:4s} {str(r.passed):5s} {r.values}")
    return payload
