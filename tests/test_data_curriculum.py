"""Curriculum phases of the synthetic DataModules: right task per step, step-aligned, resumable, clear errors."""

import pytest
from helpers import FAST, composed

from hydralm.data import SyntheticDataModule
from hydralm.training.pipeline import train

PHASES = [{"until_step": 2, "seq_len": 32, "num_kv_pairs": 4}, {"until_step": 3, "seq_len": 48}]


def _batches(dm, n):
    loader = iter(dm.train_dataloader())
    return [next(loader) for _ in range(n)]


def test_curriculum_phases_follow_the_step_and_end_on_the_configured_task():
    dm = SyntheticDataModule("mqar", {"seq_len": 64, "num_kv_pairs": 8, "vocab": 64}, batch_size=2, curriculum=PHASES)
    lengths = [b["input_ids"].shape[1] for b in _batches(dm, 5)]
    assert lengths == [32, 32, 48, 64, 64]
    assert dm.seq_len == 64  # val/test and the model-facing length are the configured task's
    plain = SyntheticDataModule("mqar", {"seq_len": 64, "num_kv_pairs": 8, "vocab": 64}, batch_size=2)
    assert (_batches(plain, 4)[3]["input_ids"] == _batches(dm, 4)[3]["input_ids"]).all()  # same samples after


def test_a_resumed_datamodule_continues_inside_its_phase():
    def make():
        return SyntheticDataModule(
            "mqar", {"seq_len": 64, "num_kv_pairs": 8, "vocab": 64}, batch_size=2, curriculum=PHASES
        )

    full = _batches(make(), 3)
    resumed = make()
    resumed.load_state_dict({"epoch": 0, "samples_consumed": 2, "fingerprint": resumed.data_fingerprint()})
    again = _batches(resumed, 2)
    assert [b["input_ids"].shape[1] for b in again] == [32, 48]
    assert (again[0]["input_ids"] == full[1]["input_ids"]).all() and (
        again[1]["input_ids"] == full[2]["input_ids"]
    ).all()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"curriculum": [{"until_step": 3}, {"until_step": 3}]}, "curriculum[1].until_step=3 must be an int > 3"),
        ({"curriculum": [{"seq_len": 32}]}, "curriculum[0].until_step=None"),
        ({"curriculum": PHASES, "shuffle": True}, "set shuffle=false"),
        ({"curriculum": [{"until_step": 2, "num_kv_pairs": 0}]}, "num_kv_pairs"),
    ],
)
def test_bad_curricula_fail_with_one_message_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        SyntheticDataModule("mqar", {"seq_len": 64, "num_kv_pairs": 8, "vocab": 64}, batch_size=2, **kwargs)


def test_train_py_takes_a_curriculum_override(tmp_path):
    overrides = FAST + ["data.curriculum=[{until_step:2,seq_len:64,num_facts:2}]", "test=false"]
    with composed(tmp_path, overrides) as cfg:
        metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 4 and metrics["train/loss"] == metrics["train/loss"]
