"""Exact resume through a real Lightning Trainer: the batches after a restart from the step-N
checkpoint are the batches an uninterrupted run saw after step N."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hydralm.data import SyntheticDataModule, TextDataModule


class Recorder(L.LightningModule):
    """Trivial model: records what it trains on; a real (if useless) optimizer step per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(make_dm, root: Path, max_steps: int, ckpt_path: str | None = None, val: bool = False) -> Recorder:
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2 if val else 0,
        limit_val_batches=2 if val else 0,
        # Every step is kept, as a kill -9 at any step would leave that step's checkpoint behind.
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|bottleneck|dirpath has changed).*")
        trainer.fit(model, datamodule=make_dm(), ckpt_path=ckpt_path)
    return model


def assert_resume_is_exact(make_dm, tmp_path: Path, total: int, stops: list[int], val: bool = False) -> None:
    full = fit(make_dm, tmp_path / "full", total, val=val)
    assert len(full.seen) == total
    for stop in stops:
        ckpt = tmp_path / "full" / "ckpt" / f"step={stop}.ckpt"
        resumed = fit(make_dm, tmp_path / f"resume{stop}", total, ckpt_path=str(ckpt), val=val)
        assert len(resumed.seen) == total - stop
        for step, (expected, got) in enumerate(zip(full.seen[stop:], resumed.seen), start=stop):
            assert torch.equal(expected, got), f"resume from step {stop}: batch of step {step} differs"
    # The position is in the checkpoint as plain ints, loadable without unpickling code.
    state = torch.load(tmp_path / "full" / "ckpt" / f"step={stops[0]}.ckpt", weights_only=True)
    dm_state = state[type(make_dm()).__qualname__]
    assert dm_state["samples_consumed"] > 0


def test_synthetic_resume_within_one_epoch(tmp_path):
    def make_dm():
        return SyntheticDataModule(
            "retrieval_qa",
            {"seq_len": 48, "num_facts": 3, "num_queries": 2, "vocab": 64},
            batch_size=2,
            num_val_samples=8,
            seed=7,
        )

    assert_resume_is_exact(make_dm, tmp_path, total=8, stops=[3], val=True)
    # Sanity: without the restored position the data would restart at the beginning.
    assert not torch.equal(fit(make_dm, tmp_path / "fresh", 1).seen[0], fit(make_dm, tmp_path / "full2", 4).seen[3])


def test_shuffled_resume_across_epoch_boundaries_with_workers(tmp_path):
    # 5 batches per epoch, shuffled per epoch, DataLoader workers prefetching ahead: stops mid-epoch,
    # on the last batch of an epoch, and in the next epoch.
    def make_dm():
        return SyntheticDataModule(
            "mqar",
            {"seq_len": 32, "num_kv_pairs": 4, "vocab": 64},
            batch_size=4,
            num_train_samples=20,
            num_val_samples=8,
            shuffle=True,
            num_workers=2,
            seed=1,
        )

    assert_resume_is_exact(make_dm, tmp_path, total=13, stops=[2, 5, 7], val=True)


def test_text_resume_map_style_and_streaming(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"text": f"document {i}: " + "lorem ipsum " * (i % 7 + 1)} for i in range(40)]
    corpus.write_text("\n".join(json.dumps(d) for d in docs))

    def module(**kwargs):
        return TextDataModule(
            str(corpus), seq_len=16, batch_size=3, val_fraction=0.1, test_fraction=0.0, seed=2, **kwargs
        )

    def map_style():
        return module(cache_dir=str(tmp_path / "hf"))

    def streaming():
        return module(streaming=True, shuffle=True, shuffle_buffer=8)

    assert_resume_is_exact(map_style, tmp_path / "map", total=9, stops=[4])
    assert_resume_is_exact(streaming, tmp_path / "stream", total=9, stops=[4])


@pytest.mark.parametrize("num_workers", [2])
def test_streaming_resume_with_workers_over_shards(tmp_path, num_workers):
    # Two files = two shards: each worker streams one, batches alternate between workers, and the
    # resumed run must skip the right number of windows in each.
    for shard in range(2):
        docs = [{"text": f"shard {shard} doc {i} " + "abc " * (i % 5 + 2)} for i in range(30)]
        (tmp_path / f"part{shard}.jsonl").write_text("\n".join(json.dumps(d) for d in docs))

    def make_dm():
        return TextDataModule(
            str(tmp_path / "part*.jsonl"),
            seq_len=12,
            batch_size=2,
            val_fraction=0.0,
            test_fraction=0.0,
            streaming=True,
            shuffle=False,
            num_workers=num_workers,
        )

    # Stop 3 resumes on worker 1's turn (the loader's order must be rotated), stop 4 on worker 0's.
    assert_resume_is_exact(make_dm, tmp_path / "run", total=9, stops=[3, 4])
    # Not vacuous: consecutive batches really come from different workers (= different shard files).
    first_rows = [batch[0] for batch in fit(make_dm, tmp_path / "probe", 4).seen]
    shard_of = [bytes((row[row > 2] - 3).tolist()).decode().split("shard ")[1][0] for row in first_rows]
    assert shard_of == ["0", "1", "0", "1"], shard_of
