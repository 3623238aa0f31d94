"""Train a model for a claim or an evaluation through the same code path as `train.py`."""

import glob
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict


def conf_dir() -> str:
    """The config folder: the running Hydra app's own (evaluate.py's `conf/`); outside an app (tests, the Python
    API), $HYDRALM_CONF_DIR or `conf/` under the working directory."""
    if HydraConfig.initialized():
        for source in HydraConfig.get().runtime.config_sources:
            if source.provider == "main" and source.schema == "file":
                return source.path
    path = os.environ.get("HYDRALM_CONF_DIR") or os.path.join(os.getcwd(), "conf")
    if not os.path.isfile(os.path.join(path, "train.yaml")):
        raise FileNotFoundError(
            f"no Hydra config folder at {path!r} (train.yaml missing): run from the repository root or set "
            "HYDRALM_CONF_DIR to the project's conf/ folder"
        )
    return os.path.abspath(path)


class ValLossTimer(L.Callback):
    """Records (seconds since fit start, val/loss) at every validation: the curve C6 compares."""

    def __init__(self):
        self.curve: List[tuple] = []
        self.started = None

    def on_train_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self.started is not None and not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.curve.append((time.perf_counter() - self.started, float(trainer.callback_metrics["val/loss"])))


def compose_train_config(overrides: List[str], output_dir: str) -> DictConfig:
    """conf/train.yaml with `overrides`, writing into output_dir (works inside or outside a Hydra app)."""
    overrides = list(overrides) + [
        f"paths.output_dir={output_dir}",
        f"paths.log_dir={output_dir}",
        "print_config=false",
        "test=false",
        "callbacks.rich_progress_bar=null",
        "++trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    config_dir = conf_dir()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def load_summary(output_dir: str, seed: Optional[int]) -> Dict:
    """A run folder's metrics.json ({} without one). A folder remembers the seed it trained with and refuses
    another (seed None: any)."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        summary = json.load(f)
    if seed is not None and summary.get("seed", seed) != seed:
        raise ValueError(
            f"{output_dir} holds a run trained with seed={summary['seed']}; seed={seed} cannot continue it: train "
            "that seed in another folder (for the claim suite, another eval.workdir)"
        )
    return summary


def train_model(
    overrides: List[str],
    output_dir: str,
    record_val_curve: bool = False,
    seconds: Optional[float] = None,
    resume: bool = False,
) -> Dict:
    """Train with `python train.py <overrides>` semantics; returns the trained model (eval mode) and timing.

    seconds: stop this call's training after that much wall time (at a step boundary, `CallTimeLimit`), writing
    output_dir/checkpoints/last.ckpt. resume: continue from that file when it exists (optimizer, schedule and data
    position restored; a run that already finished is only loaded). "seconds" sums the training time of every
    call; "finished" is False when the time limit stopped the run before its end."""
    from hydralm.training.callbacks import CallTimeLimit
    from hydralm.training.pipeline import train

    os.makedirs(output_dir, exist_ok=True)
    last = os.path.join(output_dir, "checkpoints", "last.ckpt")
    cfg = compose_train_config(
        overrides + ([f"ckpt_path={last}"] if resume and os.path.isfile(last) else []), output_dir
    )
    timer = ValLossTimer()
    limit = None if seconds is None else CallTimeLimit(seconds, os.path.dirname(last))
    with open_dict(cfg):
        cfg.paths.root_dir = str(Path(conf_dir()).parent)
        csv_logger = (cfg.get("logger") or {}).get("csv")
        if cfg.get("ckpt_path") and csv_logger is not None:  # a resumed call logs beside the earlier calls' logs
            csv_logger.version = f"call{len(glob.glob(os.path.join(output_dir, 'csv', 'call*'))) + 2}"
    # A resumed run adds this call's time to the earlier calls' (a finished run only loads: ~0 s, metrics kept).
    earlier = load_summary(output_dir, cfg.get("seed")) if cfg.get("ckpt_path") else {}
    started = time.perf_counter()
    metrics, objects = train(cfg, extra_callbacks=[c for c in (timer if record_val_curve else None, limit) if c])
    seconds_taken = earlier.get("seconds", 0.0) + time.perf_counter() - started
    metrics = {**earlier.get("metrics", {}), **metrics}
    steps, max_steps = int(objects["trainer"].global_step), int(cfg.trainer.max_steps)
    finished = limit is None or not limit.stopped or steps >= max_steps
    summary = {"metrics": metrics, "seconds": seconds_taken, "val_curve": timer.curve, "finished": finished}
    summary["seed"] = cfg.get("seed")
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(summary, f)
    # Lightning's teardown moves the model to the CPU after fit; evaluate it where it trained.
    net = objects["model"].net.to(objects["trainer"].strategy.root_device).eval()
    return {
        "model": net,
        "metrics": metrics,
        "seconds": seconds_taken,
        "val_curve": timer.curve,
        "steps": steps,
        "max_steps": max_steps,
        "finished": finished,
    }
