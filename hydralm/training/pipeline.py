"""The training job behind ``train.py``: compose -> validate -> instantiate -> fit -> test.

``train(cfg)`` returns ``(metrics, objects)``; ``train.py`` hands the metric named by
``optimized_metric`` to Hydra sweepers. Every artifact goes under ``paths.output_dir`` (the Hydra run
dir); side effects (run_info.json, config printing) happen on rank 0 only.
"""

import logging
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig as HydraRuntime
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from hydralm.config import HydraConfig
from hydralm.data import SyntheticDataModule
from hydralm.export import not_a_checkpoint_file, read_checkpoint
from hydralm.training.callbacks import ProgressLog, metrics_text
from hydralm.training.checkpoint_io import AtomicCheckpointIO
from hydralm.training.checks import check_optimized_metric, check_optimizer, check_trainer
from hydralm.training.lit_module import HydraLMModule
from hydralm.training.run_dirs import last_checkpoint, register_resolver, remove_stale_temporaries
from hydralm.training.run_info import write_run_info

log = logging.getLogger(__name__)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a bad value surfaces as its own error (one message naming the field),
    not wrapped in Hydra's InstantiationException."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise


def build_module(cfg: DictConfig) -> HydraLMModule:
    return HydraLMModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        architecture=cfg.get("architecture", "hydra"),
        compile=cfg.get("compile", False),
        nonfinite=cfg.get("nonfinite", "skip"),
        activation_checkpointing=cfg.get("activation_checkpointing", False),
    )


def instantiate_group(group: Optional[DictConfig]) -> List[Any]:
    """Instantiate every entry of a config group that has a _target_ (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if isinstance(entry, DictConfig) and "_target_" in entry]


def sweeper_optimizes() -> bool:
    """True inside a Hydra sweep whose sweeper uses the returned metric (Optuna; not the grid BasicSweeper)."""
    if not HydraRuntime.initialized():
        return False
    hydra_cfg = HydraRuntime.get()
    target = str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or "")
    return hydra_cfg.mode == RunMode.MULTIRUN and bool(target) and not target.endswith("BasicSweeper")


def validate(cfg: DictConfig, datamodule: Any) -> HydraConfig:
    """Fail before training with one message per problem (the model and data configs validate themselves)."""
    check_optimizer(OmegaConf.to_container(cfg.optimizer, resolve=True))
    check_trainer(OmegaConf.to_container(cfg.trainer, resolve=True))
    if sweeper_optimizes():
        check_optimized_metric(cfg, answers_logged=isinstance(datamodule, SyntheticDataModule))
    model_cfg = HydraConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    data_vocab = getattr(datamodule, "vocab_size", None)
    if data_vocab is not None and data_vocab > model_cfg.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's vocabulary ({data_vocab} tokens); "
            f"set model.vocab_size={data_vocab} or more"
        )
    return model_cfg


def resolve_ckpt_path(cfg: DictConfig) -> Optional[str]:
    """The checkpoint to resume from, checked before the Trainer is built: ``last`` becomes a file
    (run_dirs.last_checkpoint); a folder, a missing file or an unreadable one fails with one line."""
    ckpt = cfg.get("ckpt_path")
    if ckpt is None or ckpt in ("hpc", "registry"):  # Lightning's own lookups
        return ckpt
    if ckpt == "last":
        ckpt = last_checkpoint(cfg.paths.output_dir, cfg.paths.log_dir, cfg.task_name)
    ckpt = str(ckpt)
    if os.path.isdir(ckpt):
        raise IsADirectoryError(not_a_checkpoint_file(ckpt))
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"ckpt_path={ckpt!r} does not exist (use a .ckpt file path or 'last')")
    try:
        read_checkpoint(ckpt, mmap=True)  # a truncated or foreign file fails here, not inside Lightning
    except ValueError as err:
        raise ValueError(f"ckpt_path: {err}") from None
    return ckpt


@rank_zero_only
def _record_run(cfg: DictConfig) -> None:
    write_run_info(cfg.paths.output_dir, cfg.paths.root_dir)
    if cfg.get("print_config", True):
        print(OmegaConf.to_yaml(cfg, resolve=True))


def train(cfg: DictConfig, extra_callbacks: Optional[List[Any]] = None) -> Tuple[Dict[str, float], Dict[str, Any]]:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():  # CPU runs keep torch's default (IEEE fp32)
        torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision") or "highest")
    register_resolver()  # a config composed outside train.py may still name ${unique_dir:...}
    datamodule = instantiate(cfg.data)
    validate(cfg, datamodule)
    ckpt_path = resolve_ckpt_path(cfg)
    module = build_module(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks")) + list(extra_callbacks or [])
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks, progress = choose_progress(cfg, callbacks)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], **progress
    )
    _record_run(cfg)
    if cfg.get("train", True):
        _clean_checkpoint_folders(trainer, ckpt_path)

    objects = {"cfg": cfg, "datamodule": datamodule, "model": module, "trainer": trainer}
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        _save_final_state(trainer)
    train_metrics = dict(trainer.callback_metrics)
    if cfg.get("test", False):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
    metrics = {k: float(v) for k, v in {**train_metrics, **trainer.callback_metrics}.items()}
    _report_end(cfg, trainer, metrics)
    return metrics, objects


PROGRESS = ("auto", "bar", "text")


def choose_progress(cfg: DictConfig, callbacks: List[Any]) -> Tuple[List[Any], Dict[str, Any]]:
    """A progress bar on a terminal; plain-text lines (ProgressLog) when stdout is not one (redirected to a
    file, a batch job), where a bar only leaves its last frame. ``progress=bar|text`` forces either;
    ``trainer.enable_progress_bar=false`` turns both off. Returns the callbacks and extra Trainer kwargs."""
    mode = cfg.get("progress", "auto")
    if mode not in PROGRESS:
        raise ValueError(f"progress={mode!r} is invalid: expected one of {list(PROGRESS)}")
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() else "text"
    wanted = cfg.trainer.get("enable_progress_bar", True) is not False
    for callback in callbacks:
        if isinstance(callback, ProgressLog):
            callback.step_lines = wanted and mode == "text"
            callback.console = wanted and mode == "text"
    if wanted and mode == "bar":
        return callbacks, {}
    return [c for c in callbacks if not isinstance(c, ProgressBar)], {"enable_progress_bar": False}


@rank_zero_only
def _report_end(cfg: DictConfig, trainer: L.Trainer, metrics: Dict[str, float]) -> None:
    """The closing lines: where the run is, its checkpoints and its final metrics."""
    lines = [f"run folder: {os.path.abspath(cfg.paths.output_dir)}"]
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor is not None and callback.best_model_path:
            score = callback.best_model_score
            note = f" ({callback.monitor} {float(score):.4f})" if score is not None else ""
            lines.append(f"  best checkpoint: {callback.best_model_path}{note}")
        elif callback.monitor is None and callback.filename == "last" and callback.dirpath:
            last = os.path.join(callback.dirpath, "last.ckpt")
            if os.path.isfile(last):
                lines.append(f"  last checkpoint: {last}")
    final = {k: v for k, v in metrics.items() if re.fullmatch(r"(train|val|test)/(loss|acc|ppl)", k)}
    lines.append(f"  final metrics: {metrics_text(final) or 'none logged'}")
    log.info("\n".join(lines))


@rank_zero_only
def _clean_checkpoint_folders(trainer: L.Trainer, ckpt_path: Optional[str]) -> None:
    """Unfinished checkpoint writes of killed runs, in this run's checkpoint folders and the resumed one's."""
    folders = {cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    if ckpt_path and os.path.isfile(ckpt_path):
        folders.add(os.path.dirname(os.path.abspath(ckpt_path)))
    for folder in sorted(folders):
        remove_stale_temporaries(folder)


def _save_final_state(trainer: L.Trainer) -> None:
    """last.ckpt always ends as the final state (periodic saves may stop short of the last step)."""
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor is None and callback.filename == "last" and callback.dirpath:
            trainer.save_checkpoint(os.path.join(callback.dirpath, "last.ckpt"), weights_only=False)


def optimized_metric(metrics: Dict[str, float], name: Optional[str]) -> Optional[float]:
    """The value a Hydra sweeper optimises (None, with a warning, if it was never logged)."""
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric=%r was not logged (is validation off?); logged: %s", name, sorted(metrics))
        return None
    return metrics[name]
