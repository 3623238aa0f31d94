"""Run folders: one folder per run, `ckpt_path=last` found among earlier runs, and no litter left behind.

* ``unique_dir`` (the ``${unique_dir:...}`` resolver in conf/hydra/default.yaml): two runs started in the same
  second would otherwise share ``logs/<task>/runs/<date>_<time>/`` and overwrite each other's checkpoints.
* ``last_checkpoint``: ``ckpt_path=last`` means this run folder's ``checkpoints/last.ckpt`` when it has one
  (``hydra.run.dir=<old run>``), else the newest ``last.ckpt`` among the runs of the same ``task_name``.
* ``remove_stale_temporaries`` / ``remove_if_empty``: what killed writes and failed runs leave behind.
"""

import glob
import logging
import os
import re
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

RESOLVER = "unique_dir"
# What Hydra itself writes into a run folder before the job runs: a folder holding only these has nothing of
# the run in it.
HYDRA_BOOKKEEPING = {".hydra": {"config.yaml", "hydra.yaml", "overrides.yaml"}}
_TEMPORARY = re.compile(r"\.tmp-(\d+)$")
_claimed: Dict[str, str] = {}


def unique_dir(path: str) -> str:
    """``path``, or ``path_2``, ``path_3`` ... when another run already has it. The folder is created here:
    ``os.mkdir`` is atomic, so of two runs asking for the same name in the same second one gets ``path`` and
    the other ``path_2`` (also on a shared file system). The same process always gets the same answer."""
    if path in _claimed:
        return _claimed[path]
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            os.mkdir(candidate)
            break
        except FileExistsError:
            n += 1
            candidate = f"{path}_{n}"
    _claimed[path] = candidate
    return candidate


def register_resolver() -> None:
    """Make ``${unique_dir:...}`` available to Hydra configs; call before ``@hydra.main`` composes one.
    ``use_cache`` keeps the answer with the config, so Hydra's per-job copies of a sweep config agree."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, unique_dir, use_cache=True)


# -- ckpt_path=last ---------------------------------------------------------------------------------
def run_folders(log_dir: str, task_name: str) -> List[str]:
    """Every run folder of ``task_name``: ``runs/<run>`` and ``multiruns/<sweep>/<job>``."""
    root = os.path.join(log_dir, task_name)
    found = glob.glob(os.path.join(root, "runs", "*")) + glob.glob(os.path.join(root, "multiruns", "*", "*"))
    return sorted(p for p in found if os.path.isdir(p))


def last_checkpoint(output_dir: str, log_dir: str, task_name: str) -> str:
    """The file ``ckpt_path=last`` stands for (see the module docstring); FileNotFoundError listing the runs
    when no run has one."""
    own = os.path.join(output_dir, "checkpoints", "last.ckpt")
    if os.path.isfile(own):
        return own
    runs = run_folders(log_dir, task_name)
    candidates = [os.path.join(r, "checkpoints", "last.ckpt") for r in runs]
    candidates = [c for c in candidates if os.path.isfile(c)]
    if not candidates:
        listing = ", ".join(os.path.basename(r) for r in runs[-10:]) or "none"
        raise FileNotFoundError(
            f"ckpt_path=last: no run of task_name={task_name!r} under {os.path.join(log_dir, task_name)} has "
            f"checkpoints/last.ckpt (runs: {listing}); pass ckpt_path=<a .ckpt file> or "
            "hydra.run.dir=<the run folder to continue>"
        )
    newest = max(candidates, key=os.path.getmtime)
    log.info("ckpt_path=last: resuming from the newest last.ckpt of task_name=%r: %s", task_name, newest)
    return newest


# -- litter -----------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: Optional[str]) -> List[str]:
    """Delete ``<name>.tmp-<pid>`` files (checkpoint writes cut short by a kill) whose writer is no longer
    running; a write still in progress (its pid alive) is left alone. Returns the removed paths."""
    if not folder or not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _TEMPORARY.search(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(path) and not _pid_alive(int(match.group(1))):
            try:
                os.remove(path)
            except FileNotFoundError:  # another process cleaned it first
                continue
            removed.append(path)
    if removed:
        log.info("removed %d unfinished checkpoint write(s) of killed runs: %s", len(removed), removed)
    return removed


def holds_only_bookkeeping(folder: str, job_log: Optional[str] = None) -> bool:
    """True if ``folder`` holds nothing but Hydra's ``.hydra/`` files and the job's console log."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name in HYDRA_BOOKKEEPING and os.path.isdir(path):
            if not set(os.listdir(path)) <= HYDRA_BOOKKEEPING[name]:
                return False
        elif not (name == job_log and os.path.isfile(path)):
            return False
    return True


def remove_if_empty(folder: str, job_log: Optional[str] = None) -> bool:
    """Remove the run folder of a run that failed before writing anything (only Hydra's bookkeeping and the
    console log ``job_log`` in it). Files are removed by name and folders with ``os.rmdir``, which refuses a
    non-empty folder: nothing else is ever deleted."""
    if not os.path.isdir(folder) or not holds_only_bookkeeping(folder, job_log):
        return False
    try:
        for sub, names in HYDRA_BOOKKEEPING.items():
            for name in names:
                path = os.path.join(folder, sub, name)
                if os.path.isfile(path):
                    os.remove(path)
            if os.path.isdir(os.path.join(folder, sub)):
                os.rmdir(os.path.join(folder, sub))
        if job_log and os.path.isfile(os.path.join(folder, job_log)):
            os.remove(os.path.join(folder, job_log))
        os.rmdir(folder)
    except OSError:  # something appeared meanwhile: keep it
        return False
    return True


@contextmanager
def removed_on_early_failure() -> Iterator[None]:
    """Around a Hydra job: when it raises before writing anything into its run folder, remove the folder
    (``remove_if_empty``), so failed attempts do not pile up as empty runs; the error still propagates."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    folder, job_log = hydra_cfg.runtime.output_dir, f"{hydra_cfg.job.name}.log"
    try:
        yield
    except BaseException:
        remove_if_empty(folder, job_log)
        raise
