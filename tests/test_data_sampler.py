"""DDP sharding without duplicates and mid-epoch restart, with ranks simulated by arguments."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DistributedSampler

from hydralm.data import ResumableDistributedSampler, SyntheticDataModule


def shards(num_samples, world, **kwargs):
    return [list(ResumableDistributedSampler(num_samples, rank, world, **kwargs)) for rank in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_get_disjoint_equal_shards(world, shuffle):
    parts = shards(103, world, shuffle=shuffle, seed=5)
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat)) == (103 // world) * world  # no duplicates, only the tail dropped
    assert {len(p) for p in parts} == {103 // world}  # ranks step together


def global_stream(world, batch, steps, start=0, num_samples=96, epoch=0):
    """Indices in the order one DDP step after another consumes them (rank-major within a step)."""
    samplers = []
    for rank in range(world):
        s = ResumableDistributedSampler(num_samples, rank, world, shuffle=True, seed=1, start=start, start_epoch=0)
        s.set_epoch(epoch)
        samplers.append(list(s))
    order = []
    for step in range(steps):
        for row in range(batch):
            for rank in range(world):
                order.append(samplers[rank][step * batch + row])
    return order


def test_stream_is_independent_of_world_size_and_resumes_exactly():
    single = global_stream(world=1, batch=8, steps=12)
    assert sorted(global_stream(world=2, batch=4, steps=12)) == sorted(single)
    # Per step, ranks take one contiguous block of the stream: 2 ranks x 4 rows == 1 rank x 8 rows.
    two = global_stream(world=2, batch=4, steps=12)
    assert all(sorted(two[k * 8 : (k + 1) * 8]) == sorted(single[k * 8 : (k + 1) * 8]) for k in range(12))
    # Resume after 40 samples on 4 ranks: the continuation is the rest of the same stream.
    resumed = global_stream(world=4, batch=2, steps=7, start=40)
    assert sorted(resumed) == sorted(single[40:96])


def test_start_applies_to_its_epoch_only_and_len_keeps_the_full_epoch():
    sampler = ResumableDistributedSampler(20, rank=0, world_size=1, shuffle=True, seed=0, start=12, start_epoch=3)
    sampler.set_epoch(3)
    assert len(sampler) == 20  # Lightning's restored batch counter still ends the epoch at 20
    assert list(sampler) == list(sampler.stream(3))[12:]
    sampler.set_epoch(4)
    assert list(sampler) == list(sampler.stream(4)) and list(sampler.stream(4)) != list(sampler.stream(3))


def test_datamodule_shards_by_rank_and_lightning_keeps_its_sampler(monkeypatch):
    dm = SyntheticDataModule(
        "mqar", {"seq_len": 32, "num_kv_pairs": 4, "vocab": 64}, batch_size=4, num_train_samples=64, num_val_samples=30
    )
    rows = {"train": [], "val": []}
    for rank in range(3):
        monkeypatch.setattr(dm, "rank_and_world", lambda rank=rank: (rank, 3))
        train = dm.train_dataloader()
        # A DistributedSampler subclass: Lightning's use_distributed_sampler leaves it alone.
        assert isinstance(train.sampler, DistributedSampler)
        rows["train"] += [bytes(r.numpy().tobytes()) for b in train for r in b["input_ids"]]
        rows["val"] += [bytes(r.numpy().tobytes()) for b in dm.val_dataloader() for r in b["input_ids"]]
    assert len(rows["train"]) == len(set(rows["train"])) == 3 * ((64 // 3) // 4) * 4
    assert len(rows["val"]) == len(set(rows["val"])) == 30
    assert not set(rows["train"]) & set(rows["val"])


def test_state_round_trips_and_ignores_other_data():
    dm = SyntheticDataModule("needle", {"seq_len": 32, "vocab": 64}, seed=3)
    dm._epoch, dm._consumed = 2, 48
    buffer = io.BytesIO()
    torch.save(dm.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # how Lightning reads it back under torch >= 2.6
    assert state == dm.state_dict()
    fresh = SyntheticDataModule("needle", {"seq_len": 32, "vocab": 64}, seed=3)
    fresh.load_state_dict(state)
    assert (fresh._epoch, fresh.samples_consumed) == (2, 48)
    other = SyntheticDataModule("needle", {"seq_len": 32, "vocab": 64}, seed=4)
    with pytest.warns(UserWarning, match="different data"):
        other.load_state_dict(state)
    assert other.samples_consumed == 0
    first = next(iter(fresh.train_dataloader()))["input_ids"][0]
    assert torch.equal(
        first, fresh.task.sample(fresh.train_dataloader().sampler.stream(2)[48], "train", 3)["input_ids"]
    )
