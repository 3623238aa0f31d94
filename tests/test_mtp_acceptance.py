"""The MTP experiment trains in calls of bounded length that resume exactly where they stopped, and
evaluate.py eval=mtp_acceptance reports the draft acceptance per depth on held-out text."""

import os

import pytest
import torch
from helpers import FAST, composed, tiny

from hydralm.eval.evaluate_job import evaluate
from hydralm.eval.mtp_acceptance import _teacher_forced
from hydralm.training.pipeline import train

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_TEXT_RUN = [o for o in FAST if not o.startswith(("data.", "trainer."))] + [
    "experiment=mtp_text_gpu",
    "trainer=cpu",
    "trainer.precision=32-true",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "data.seq_len=64",
    "data.batch_size=2",
    "data.num_workers=0",
    "model.retrieval_chunk_size=8",
    "model.memory.exact_window=16",
    "model.memory.pool_size=8",
    "model.memory.compress_every=4",
]


def _corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 4 for i in range(80)))
    return str(path)


def test_the_mtp_experiment_stops_at_its_call_limit_resumes_and_is_evaluated(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    first_dir = tmp_path / "first"
    overrides = TINY_TEXT_RUN + [f"data.data_files={corpus}", "callbacks.call_time_limit.seconds=1e-6"]
    with composed(first_dir, overrides) as cfg:
        assert cfg.model.mtp_depth == 2 and cfg.model.memory is not None and cfg.task_name == "train_mtp"
        _, objects = train(cfg)
    assert objects["trainer"].global_step == 1  # out of time after the first step
    last = first_dir / "checkpoints" / "last.ckpt"
    assert last.exists() and torch.load(last, weights_only=True)["global_step"] == 1

    overrides = TINY_TEXT_RUN + [f"data.data_files={corpus}", f"ckpt_path={last}"]
    with composed(tmp_path / "second", overrides) as cfg:
        _, objects = train(cfg)
    assert objects["trainer"].global_step == 6  # continued to max_steps

    out = tmp_path / "eval"
    evaluation = [
        "eval=mtp_acceptance",
        f"ckpt_path={tmp_path / 'second' / 'checkpoints' / 'last.ckpt'}",
        "device=cpu",
        f"eval.data.data_files={corpus}",
        "eval.data.seq_len=64",
        "eval.max_batches=2",
        "eval.prompts=2",
        "eval.prompt_len=16",
        "eval.new_tokens=8",
    ]
    with composed(out, evaluation, config_name="evaluate") as cfg:
        report = evaluate(cfg)
    forced, decoding = report["teacher_forced"], report["decoding"]
    assert report["mtp_depth"] == 2 and len(forced["greedy_match"]) == 2 and min(forced["positions"]) > 0
    assert all(0 <= v <= 1 for v in forced["greedy_match"] + forced["sampled_acceptance"])
    assert decoding["prompts"] == 2 and all(0 <= v <= 1 for v in decoding["acceptance_by_depth"])
    assert 1 <= decoding["tokens_per_round"] <= 3
    printed = capsys.readouterr().out
    assert "depth 2 decoding acceptance" in printed and os.path.exists(out / "mtp_acceptance.json")


def test_teacher_forced_acceptance_lines_each_module_up_with_the_position_it_drafts():
    """The training-form count equals drafting position by position with the decode form (MTPHead.draft_step
    from the hidden state at t and the text's own tokens) against the main head's greedy token there."""
    model = tiny("mixed")
    ids = torch.randint(0, 64, (1, 12))
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    greedy, sampled, counts = [0.0, 0.0], [0.0, 0.0], [0, 0]
    with torch.no_grad():
        _teacher_forced(model, ids, labels, greedy, sampled, counts)
        out = model(ids, return_hidden=True)
        logits, hidden = out["logits"][0], out["hidden"][0]
        expected = [0, 0]
        for t in range(11):
            h = hidden[t : t + 1]
            for depth in (1, 2):
                if t + depth >= 11:  # the target token t + depth + 1 is past the text
                    break
                h, draft = model.mtp.draft_step(depth, h, ids[0, t + depth : t + depth + 1], model.embed, model.lm_head)
                expected[depth - 1] += int(draft.argmax(-1) == logits[t + depth].argmax(-1))
    assert counts == [10, 9] and greedy == expected


def test_mtp_acceptance_needs_an_mtp_head(tmp_path):
    from hydralm.eval.mtp_acceptance import mtp_acceptance

    with pytest.raises(ValueError, match="mtp_depth > 0"):
        mtp_acceptance(tiny("mixed", mtp_depth=0), datamodule=None)
