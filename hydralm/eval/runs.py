"""Train a model for a claim or an evaluation through the same code path as `train.py`."""

import json
import os
import time
from pathlib import Path
from typing import Dict, List

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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
    overrides = list(overrides) + [f"paths.output_dir={output_dir}", f"paths.log_dir={output_dir}",
                                   "print_config=false", "test=false", "callbacks.rich_progress_bar=null",
                                   "++trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def train_model(overrides: List[str], output_dir: str, record_val_curve: bool = False) -> Dict:
    """Train with `python train.py <overrides>` semantics; returns the trained model (eval mode) and timing."""
    from hydralm.training.pipeline import train

    os.makedirs(output_dir, exist_ok=True)
    cfg = compose_train_config(overrides, output_dir)
    timer = ValLossTimer()
    with open_dict(cfg):
        cfg.paths.root_dir = str(Path(CONF_DIR).parent)
    started = time.perf_counter()
    metrics, objects = train(cfg, extra_callbacks=[timer] if record_val_curve else [])
    seconds = time.perf_counter() - started
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump({"metrics": metrics, "seconds": seconds, "val_curve": timer.curve}, f, indent=2)
    # Lightning's teardown moves the model to the CPU after fit; evaluate it where it trained.
    net = objects["model"].net.to(objects["trainer"].strategy.root_device).eval()
    return {"model": net, "metrics": metrics, "seconds": seconds, "val_curve": timer.curve,
            "steps": int(objects["trainer"].global_step)}
