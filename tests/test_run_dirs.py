"""Run folders: unique per run, `ckpt_path=last` found among earlier runs, no litter from killed or failed runs."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import FAST, ROOT, composed
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf

from hydralm.training import run_dirs
from hydralm.training.pipeline import resolve_ckpt_path, train


@pytest.fixture
def frozen_clock():
    """Every `${now:...}` reads the same second, as for two runs started together."""
    yield lambda: OmegaConf.register_new_resolver("now", lambda pattern: "2026-11-29_10-00-00", replace=True)
    setup_globals()  # Hydra's own `now` again


def test_two_runs_started_in_the_same_second_get_different_folders(tmp_path, frozen_clock, monkeypatch):
    folders = []
    for _ in range(2):
        monkeypatch.setattr(run_dirs, "_claimed", {})  # a second process remembers nothing of the first
        with composed(tmp_path, []) as cfg:
            frozen_clock()
            folders.append(cfg.hydra.run.dir)
            assert cfg.hydra.run.dir == folders[-1], "one run must see one folder"
    assert folders[0] != folders[1], "two runs share one folder"
    assert all(os.path.isdir(f) for f in folders)
    assert folders[1] == folders[0] + "_2"


def test_unique_dir_gives_the_name_itself_when_free(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dirs, "_claimed", {})
    path = str(tmp_path / "logs" / "train" / "runs" / "2026-11-29_10-00-00")
    assert run_dirs.unique_dir(path) == path and os.path.isdir(path)


def _fake_checkpoint(path, truncate: bool = False) -> str:
    """A file with the structure of a train.py checkpoint (enough for the checks that run before training)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"hyper_parameters": {"model": {"vocab_size": 64}}, "state_dict": {"w": torch.zeros(1000)}}, path)
    if truncate:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    return str(path)


def test_ckpt_path_last_without_a_run_folder_resumes_the_newest_run(tmp_path):
    older = _fake_checkpoint(tmp_path / "train" / "runs" / "2026-11-29_10-00-00" / "checkpoints" / "last.ckpt")
    newer = _fake_checkpoint(tmp_path / "train" / "runs" / "2026-11-29_11-00-00" / "checkpoints" / "last.ckpt")
    os.utime(older, (1e9, 1e9))
    _fake_checkpoint(tmp_path / "evaluate" / "runs" / "2026-11-29_12-00-00" / "checkpoints" / "last.ckpt")
    with composed(tmp_path / "new_run", FAST + ["ckpt_path=last"]) as cfg:
        cfg.paths.log_dir = str(tmp_path)
        assert resolve_ckpt_path(cfg) == newer
    # A run folder that has its own last.ckpt (hydra.run.dir=<old run> ckpt_path=last) resumes exactly that.
    with composed(os.path.dirname(os.path.dirname(older)), FAST + ["ckpt_path=last"]) as cfg:
        cfg.paths.log_dir = str(tmp_path)
        assert resolve_ckpt_path(cfg) == older


def test_ckpt_path_last_with_no_earlier_run_fails_listing_the_runs(tmp_path):
    os.makedirs(tmp_path / "train" / "runs" / "2026-11-29_10-00-00")
    with composed(tmp_path / "train" / "runs" / "new", FAST + ["ckpt_path=last"]) as cfg:
        cfg.paths.log_dir = str(tmp_path)
        with pytest.raises(FileNotFoundError) as err:
            train(cfg)  # before: Lightning warned and trained from scratch
    assert "ckpt_path=last" in str(err.value) and "2026-11-29_10-00-00" in str(err.value)


@pytest.mark.parametrize("kind", ["truncated", "directory"])
def test_bad_resume_checkpoint_fails_in_one_line_before_training(tmp_path, kind):
    ckpt = _fake_checkpoint(tmp_path / "old" / "checkpoints" / "last.ckpt", truncate=kind == "truncated")
    given = ckpt if kind == "truncated" else os.path.dirname(ckpt)
    with composed(tmp_path / "run", FAST + [f"ckpt_path={given}"]) as cfg:
        with pytest.raises((ValueError, IsADirectoryError)) as err:
            train(cfg)
    message = str(err.value)
    assert "\n" not in message and given in message
    if kind == "truncated":
        assert "not a readable torch checkpoint" in message
    else:
        assert "is a directory" in message and ckpt in message


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_unfinished_writes_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f"last.ckpt.tmp-{_dead_pid()}"
    live = tmp_path / f"last.ckpt.tmp-{os.getpid()}"
    keep = tmp_path / "last.ckpt"
    for path in (dead, live, keep):
        path.write_bytes(b"x")
    assert run_dirs.remove_stale_temporaries(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and keep.exists()


def test_a_run_folder_is_removed_only_when_it_holds_nothing_of_the_run(tmp_path):
    def hydra_folder(name: str):
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        for file in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (folder / ".hydra" / file).write_text("x")
        (folder / "train.log").write_text("log")
        return folder

    empty = hydra_folder("failed_early")
    assert run_dirs.remove_if_empty(str(empty), "train.log") and not empty.exists()
    started = hydra_folder("failed_later")
    (started / "run_info.json").write_text("{}")
    assert not run_dirs.remove_if_empty(str(started), "train.log")
    assert sorted(os.listdir(started)) == [".hydra", "run_info.json", "train.log"]
    assert len(os.listdir(started / ".hydra")) == 3


def test_exported_models_are_git_ignored():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "exported/model/config.json"], cwd=ROOT)
    assert ignored.returncode == 0
