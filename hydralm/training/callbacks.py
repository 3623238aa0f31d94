"""Training callbacks of our own (the standard ones come from Lightning)."""

import hashlib
import json
import logging
import math
import os
import time
from datetime import timedelta
from typing import Mapping

import lightning as L

log = logging.getLogger(__name__)


class SampleIdLogger(L.Callback):
    """Debug aid for data parallelism: every rank appends a content hash of each training row it sees to
    `<dir>/sample_ids_rank<r>.jsonl`. `duplicates_across_ranks(dir)` then checks that no row was trained on
    twice at the same step by two ranks (`python train.py debug=ddp_ids trainer=ddp_sim`)."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        os.makedirs(self.dirpath, exist_ok=True)
        rows = [hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=8).hexdigest() for row in batch["input_ids"]]
        with open(os.path.join(self.dirpath, f"sample_ids_rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rank": trainer.global_rank, "rows": rows}) + "\n")


def duplicates_across_ranks(dirpath: str) -> dict:
    """{step: [hashes seen by more than one rank]} over every sample_ids_rank*.jsonl in dirpath."""
    seen: dict = {}
    for name in sorted(os.listdir(dirpath)):
        if name.startswith("sample_ids_rank") and name.endswith(".jsonl"):
            with open(os.path.join(dirpath, name)) as f:
                for line in f:
                    record = json.loads(line)
                    for row in record["rows"]:
                        seen.setdefault(record["step"], {}).setdefault(row, set()).add(record["rank"])
    return {
        step: [h for h, ranks in rows.items() if len(ranks) > 1]
        for step, rows in seen.items()
        if any(len(ranks) > 1 for ranks in rows.values())
    }


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds))) if math.isfinite(seconds) else "?"


def _rate(tokens_per_second: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if tokens_per_second >= scale:
            return f"{tokens_per_second / scale:.2f}{unit}"
    return f"{tokens_per_second:.0f}"


def metrics_text(metrics: Mapping, prefix: str = "") -> str:
    """``val/acc 0.0781 | val/loss 2.8494`` for the scalar metrics whose name starts with ``prefix``."""
    parts = []
    for name in sorted(metrics):
        if name.startswith(prefix):
            value = float(metrics[name])
            parts.append(f"{name} {value:.4g}" if abs(value) >= 1e4 else f"{name} {value:.4f}")
    return " | ".join(parts)


class ProgressLog(L.Callback):
    """Plain-text progress for logs: where a progress bar is useless (stdout redirected to a file, a batch
    job) it prints ``step 100/400 | loss 2.31 | acc 0.05 | 12.3k tok/s | elapsed 0:01:02 | ETA 0:03:05``
    every ``every_n_steps`` steps. Validation and test metrics are logged in every mode, so train.log holds
    them next to the progress (csv/metrics.csv has them too).

    ``step_lines``: print the step lines (the pipeline turns them off when a progress bar is shown).
    ``console``: log through ``logging`` (stdout and train.log); False: train.log only, so lines do not
    tear through a live progress bar on a terminal.
    """

    def __init__(self, every_n_steps: int = 50, step_lines: bool = True, console: bool = True):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"ProgressLog.every_n_steps={every_n_steps!r} is invalid: expected an integer >= 1")
        self.every_n_steps, self.step_lines, self.console = every_n_steps, step_lines, console
        self._started = self._last_time = 0.0
        self._first_step = self._last_step = 0
        self._tokens = 0
        self._validating_since, self._validation_time = None, 0.0  # tok/s counts training time only

    def _emit(self, message: str) -> None:
        if self.console:
            log.info(message)
            return
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)

    def on_train_start(self, trainer, pl_module):
        self._started = self._last_time = time.perf_counter()
        self._first_step = self._last_step = trainer.global_step
        self._tokens, self._validation_time = 0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(batch, Mapping) and "input_ids" in batch:
            self._tokens += batch["input_ids"].numel() * trainer.world_size
        step = trainer.global_step
        if not (self.step_lines and trainer.is_global_zero) or step == self._last_step or step % self.every_n_steps:
            return
        now = time.perf_counter()
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        per_step = (now - self._started) / max(1, step - self._first_step)
        metrics = trainer.callback_metrics
        parts = [f"step {step}/{total if math.isfinite(total) else '?'}"]
        for name in ("loss", "acc"):
            if f"train/{name}" in metrics:
                parts.append(f"{name} {float(metrics[f'train/{name}']):.4f}")
        training_time = now - self._last_time - self._validation_time
        parts.append(f"{_rate(self._tokens / max(training_time, 1e-9))} tok/s")
        parts.append(f"elapsed {_duration(now - self._started)}")
        parts.append(f"ETA {_duration((total - step) * per_step if math.isfinite(total) else math.inf)}")
        self._emit(" | ".join(parts))
        self._last_time, self._last_step, self._tokens, self._validation_time = now, step, 0, 0.0

    def on_validation_start(self, trainer, pl_module):
        self._validating_since = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._validating_since is not None:
            self._validation_time += time.perf_counter() - self._validating_since
            self._validating_since = None
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._emit(f"validation at step {trainer.global_step}: {metrics_text(trainer.callback_metrics, 'val/')}")

    def on_test_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._emit(f"test: {metrics_text(trainer.callback_metrics, 'test/')}")


class CallTimeLimit(L.Callback):
    """Stop this call's training after `seconds` of wall time (from the start of fit, validation included) and
    write ``<dirpath>/last.ckpt`` at that step, so ``python train.py ... ckpt_path=last`` continues exactly where
    it stopped: a long run in calls of bounded length. Unlike ``trainer.max_time``, whose elapsed time is stored
    in the checkpoint and restored on resume (a total over all calls), this limit is per call."""

    def __init__(self, seconds: float, dirpath: str):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"CallTimeLimit.seconds={seconds!r} is invalid: expected a number of seconds > 0")
        self.seconds, self.dirpath = float(seconds), dirpath
        self._started = 0.0
        self.stopped = False  # True once this callback ended the fit before its own end

    def on_fit_start(self, trainer, pl_module):
        self._started = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        out_of_time = trainer.strategy.broadcast(time.monotonic() - self._started >= self.seconds)  # rank 0 decides
        if out_of_time and not trainer.should_stop:
            trainer.save_checkpoint(os.path.join(self.dirpath, "last.ckpt"))
            trainer.should_stop = self.stopped = True
            if trainer.is_global_zero:
                log.info(
                    "call time limit of %s reached at step %d: checkpoints/last.ckpt written; continue with "
                    "ckpt_path=last",
                    _duration(self.seconds),
                    trainer.global_step,
                )
