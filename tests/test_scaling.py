"""`python -m benchmarks.scaling --cpu`: the multi-GPU comparison script, run on CPU with ddp_sim."""

import json

import pytest

from benchmarks import scaling


# ~50 s of process start-ups on 2 cores; DDP = one process and DDP resume stay in the default suite
# (tests/test_train.py, ddp_sim).
@pytest.mark.slow
def test_scaling_script_compares_one_process_with_ddp_and_a_resumed_ddp_run(tmp_path):
    common = ["--cpu", "--steps", "4", "--global-batch", "4", "--out", str(tmp_path)]
    overrides = ["--", "model=tiny", "data.task_kwargs.seq_len=64"]
    # made in two invocations sharing one --out: the second reads the first's run instead of repeating it
    assert scaling.main([*common, "--runs", "ddp,resumed", *overrides]) == 0
    assert not (tmp_path / "scaling.json").exists()  # no table without the single-process run
    assert scaling.main([*common, *overrides]) == 0  # by default, only the runs not yet in --out: single
    rows = {row["run"]: row for row in json.loads((tmp_path / "scaling.json").read_text())["rows"]}
    assert set(rows) == {"single", "ddp", "resumed"}
    assert rows["single"]["wall_s"] > 0 and rows["ddp"]["wall_s"] is None  # ddp was read, not run again
    # same global batch: 2 gloo processes follow the 1-process run step by step (fp32, reduction order only)
    assert rows["ddp"]["steps_compared"] == 4 and rows["ddp"]["max_abs_loss_diff"] < 1e-5
    # the run resumed from the step-2 checkpoint retraces the uninterrupted ddp run
    assert rows["resumed"]["steps_compared"] == 2 and rows["resumed"]["max_abs_loss_diff"] < 1e-6
    assert all(row["tokens_per_sec"] > 0 for row in rows.values())
