"""Run folders: unique per run, `ckpt_path=last` found among earlier runs, no litter from killed or failed runs."""

import os

import pytest
from helpers import composed
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf

from hydralm.training import run_dirs


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
