"""Checks of a training config that run before the Trainer is built, each failing with one line naming the field.

Lightning and torch would reject most of these values too, but minutes later (after data setup) and deep in
a 45-line traceback; the model and data configs check themselves when they are built.
"""

import math
from typing import Any, Mapping, Optional

from hydralm.training.optim import OPTIMIZERS


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field}={value!r} is invalid: expected {allowed}")


def check_optimizer(opt: Mapping[str, Any]) -> None:
    """``optimizer.*``: name, lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio, fused."""
    if opt.get("name") not in OPTIMIZERS:
        _fail("optimizer.name", opt.get("name"), f"one of {list(OPTIMIZERS)}")
    lr = opt.get("lr")
    if not _number(lr) or lr <= 0:
        _fail("optimizer.lr", lr, "a number > 0 (e.g. 3e-3 for tiny, 6e-4 to 1e-3 for 160m)")
    weight_decay = opt.get("weight_decay", 0.0)
    if not _number(weight_decay) or weight_decay < 0:
        _fail("optimizer.weight_decay", weight_decay, "a number >= 0")
    betas = opt.get("betas", (0.9, 0.95))
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
        _fail("optimizer.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")
    eps = opt.get("eps", 1e-8)
    if not _number(eps) or eps <= 0:
        _fail("optimizer.eps", eps, "a number > 0")
    warmup = opt.get("warmup_steps", 0)
    if warmup is not None and (not _int(warmup) or warmup < 0):
        _fail("optimizer.warmup_steps", warmup, "an integer >= 0")
    floor = opt.get("min_lr_ratio", 0.1)
    if not _number(floor) or not 0 <= floor <= 1:
        _fail("optimizer.min_lr_ratio", floor, "a number in [0, 1]")
    if opt.get("fused") not in (None, True, False):
        _fail("optimizer.fused", opt.get("fused"), "null, true or false")


def _steps_or_fraction(field: str, value: Any, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if _int(value):
        if value < low:
            _fail(field, value, f"an integer >= {low} (batches) or a fraction in {'[' if allow_zero else '('}0, 1]")
    elif isinstance(value, float):
        if not (0 <= value <= 1) or (value == 0 and not allow_zero):
            _fail(field, value, f"a fraction in {'[' if allow_zero else '('}0, 1] or an integer number of batches")
    else:
        _fail(field, value, "an integer number of batches or a fraction")


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """The ``trainer.*`` values whose mistakes Lightning reports late or obscurely."""
    max_steps = trainer.get("max_steps", -1)
    if not _int(max_steps) or (max_steps < 1 and max_steps != -1):
        _fail("trainer.max_steps", max_steps, "an integer >= 1, or -1 (no limit: then set max_epochs)")
    max_epochs = trainer.get("max_epochs")
    if max_epochs is not None and (not _int(max_epochs) or (max_epochs < 1 and max_epochs != -1)):
        _fail("trainer.max_epochs", max_epochs, "an integer >= 1, -1 or null")
    if max_steps == -1 and max_epochs in (None, -1):
        raise ValueError("trainer.max_steps=-1 and trainer.max_epochs unset: set one, so training (and the lr) ends")
    interval = trainer.get("val_check_interval")
    if interval is not None:
        _steps_or_fraction("trainer.val_check_interval", interval, allow_zero=False)
    every = trainer.get("check_val_every_n_epoch")
    if every is not None and (not _int(every) or every < 1):
        _fail("trainer.check_val_every_n_epoch", every, "an integer >= 1 or null")
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if trainer.get(name) is not None:
            _steps_or_fraction(f"trainer.{name}", trainer[name], allow_zero=name != "limit_train_batches")
    log_every = trainer.get("log_every_n_steps", 50)
    if not _int(log_every) or log_every < 1:
        _fail("trainer.log_every_n_steps", log_every, "an integer >= 1")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not _int(accumulate) or accumulate < 1:
        _fail("trainer.accumulate_grad_batches", accumulate, "an integer >= 1")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (not _number(clip) or clip < 0):
        _fail("trainer.gradient_clip_val", clip, "a number >= 0, or null (no clipping)")


def validation_runs(cfg: Mapping[str, Any]) -> bool:
    """Whether fitting with this config ever runs validation (an int val_check_interval past max_steps, or
    limit_val_batches=0, never does)."""
    trainer = cfg["trainer"]
    if not cfg.get("train", True) or trainer.get("limit_val_batches", 1.0) in (0, 0.0):
        return False
    interval, max_steps = trainer.get("val_check_interval"), trainer.get("max_steps", -1)
    epoch_end = trainer.get("check_val_every_n_epoch") is not None
    return not (_int(interval) and not epoch_end and max_steps > 0 and interval > max_steps)


def metric_problem(cfg: Mapping[str, Any], name: str, answers_logged: bool) -> Optional[str]:
    """Why the metric ``name`` will never be logged by this run, or None if it will (or cannot be judged)."""
    stage, _, metric = name.partition("/")
    if stage == "val" and not validation_runs(cfg):
        trainer = cfg["trainer"]
        return (
            "validation never runs (train="
            f"{cfg.get('train', True)}, trainer.limit_val_batches={trainer.get('limit_val_batches')}, "
            f"trainer.val_check_interval={trainer.get('val_check_interval')} vs trainer.max_steps="
            f"{trainer.get('max_steps')})"
        )
    if stage == "test" and not cfg.get("test", False):
        return "test=false"
    if metric.startswith("acc") and not answers_logged:
        return "this data logs no answer accuracy (only the synthetic tasks do; text data logs loss and ppl)"
    return None


def check_optimized_metric(cfg: Mapping[str, Any], answers_logged: bool) -> None:
    """For a sweeper that optimises ``optimized_metric`` (Optuna): fail up front when this run cannot produce
    the metric, instead of running every trial and then failing with "No trials are completed yet". (A plain
    run does not use the value; pipeline.optimized_metric warns at its end if it was not logged.)"""
    name = cfg.get("optimized_metric")
    problem = metric_problem(cfg, name, answers_logged) if name else None
    if problem is not None:
        raise ValueError(
            f"optimized_metric={name!r} will never be logged: {problem}; enable it or choose another "
            "optimized_metric (e.g. val/loss)"
        )
