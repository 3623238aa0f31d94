"""Synthetic tasks: determinism, disjoint splits, label alignment, depths, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hydralm.data import (
    FACT_ID,
    IGNORE_INDEX,
    MQAR,
    QUERY_ID,
    Needle,
    RetrievalQA,
    SyntheticDataModule,
    SyntheticVocab,
)


def small_tasks():
    return [
        RetrievalQA(seq_len=128, num_facts=6, num_queries=3, key_len=2, vocab=128),
        MQAR(seq_len=64, num_kv_pairs=8, vocab=128),
        Needle(seq_len=64, depth=None, vocab=128),
    ]


def as_bytes(sample) -> bytes:
    return sample["input_ids"].numpy().tobytes()


# -- vocabulary -------------------------------------------------------------------------------


def test_vocab_blocks_are_contiguous_and_disjoint():
    vocab = SyntheticVocab(vocab_size=100, num_keys=10, num_values=20)
    roles = [vocab.role(i) for i in range(100)]
    assert roles[: vocab.key_start] == ["special"] * vocab.key_start
    assert roles.count("key") == 10 and roles.count("value") == 20
    assert roles.count("filler") == vocab.num_filler == 100 - vocab.key_start - 30
    assert roles == sorted(roles, key=["special", "key", "value", "filler"].index)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vocab_size": 5}, "vocab_size"),
        ({"vocab_size": 40, "num_keys": 20, "num_values": 20}, "vocab_size"),
        ({"vocab_size": 64, "num_keys": 0}, "num_keys"),
    ],
)
def test_vocab_too_small_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticVocab(**kwargs)


# -- determinism and splits -------------------------------------------------------------------


@pytest.mark.parametrize("task", small_tasks(), ids=lambda t: t.name)
def test_same_seed_same_sample_and_indices_differ(task):
    for index in (0, 7, 123456789):
        a, b = task.sample(index, "train", seed=3), task.sample(index, "train", seed=3)
        assert all(torch.equal(a[k], b[k]) for k in a)
    samples = {as_bytes(task.sample(i, "train", seed=3)) for i in range(50)}
    assert len(samples) == 50
    assert as_bytes(task.sample(0, "train", seed=3)) != as_bytes(task.sample(0, "train", seed=4))


@pytest.mark.parametrize("task", small_tasks(), ids=lambda t: t.name)
def test_splits_are_disjoint(task):
    seen = {split: {as_bytes(task.sample(i, split)) for i in range(100)} for split in ("train", "val", "test")}
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]


def test_splits_stay_disjoint_when_the_sample_space_is_tiny():
    # ~10^3 possible sequences: independent seeds alone would collide constantly; the content-hash
    # partition must still keep every split apart.
    task = MQAR(seq_len=10, num_kv_pairs=2, vocab=SyntheticVocab(16, num_keys=2, num_values=2))
    seen = {split: {as_bytes(task.sample(i, split)) for i in range(300)} for split in ("train", "val", "test")}
    assert len(seen["train"]) < 300  # the space really is small: samples repeat within a split
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]


# -- batch format and label alignment ---------------------------------------------------------


def check_common_format(sample, task):
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.dtype == labels.dtype == sample["query_positions"].dtype == torch.int64
    assert sample["depths"].dtype == torch.float32
    assert ids.shape == labels.shape == (task.seq_len,)
    assert sample["query_positions"].shape == sample["depths"].shape == (task.num_queries,)
    assert ((0 <= ids) & (ids < task.vocab_size)).all()
    positions = sample["query_positions"]
    # Loss only on answers by default; each answer is the next input token.
    assert (labels != IGNORE_INDEX).sum() == task.num_queries
    assert torch.equal(labels[positions], ids[positions + 1])
    assert ((sample["depths"] >= 0) & (sample["depths"] <= 1)).all()
    # The source of each answer is the earlier token the model has to recall.
    sources = sample["source_positions"]
    assert sources.dtype == torch.int64 and sources.shape == (task.num_queries,)
    assert (sources < positions).all() and torch.equal(ids[sources], labels[positions])


def facts_of(ids: np.ndarray, key_len: int) -> dict[tuple, tuple[int, int]]:
    """key -> (fact start, value), read back from the sequence."""
    starts = np.flatnonzero(ids == FACT_ID)
    return {tuple(ids[s + 1 : s + 1 + key_len]): (int(s), int(ids[s + 1 + key_len])) for s in starts}


@pytest.mark.parametrize("index", range(20))
def test_retrieval_qa_labels_are_the_queried_facts_values_at_recorded_depths(index):
    task = RetrievalQA(seq_len=200, num_facts=8, num_queries=4, key_len=2, vocab=96)
    sample = task.sample(index, "val", seed=1)
    check_common_format(sample, task)
    ids = sample["input_ids"].numpy()
    facts = facts_of(ids, task.key_len)
    assert len(facts) == task.num_facts  # keys distinct within a sample
    hay_start, hay_end = task.haystack
    for pos, label, depth, source in zip(
        sample["query_positions"],
        sample["labels"][sample["query_positions"]],
        sample["depths"],
        sample["source_positions"],
    ):
        pos = int(pos)
        assert ids[pos - task.key_len] == QUERY_ID and pos >= hay_end
        start, value = facts[tuple(ids[pos - task.key_len + 1 : pos + 1])]
        assert int(label) == value
        assert float(depth) == pytest.approx((start - hay_start) / (hay_end - hay_start - task.fact_len))
        assert int(source) == start + task.fact_len - 1  # the fact's value token
    assert len(set(sample["query_positions"].tolist())) == task.num_queries


def test_retrieval_qa_depths_cover_the_whole_haystack():
    task = RetrievalQA(seq_len=256, num_facts=8, num_queries=8, vocab=128)
    depths = torch.cat([task.sample(i)["depths"] for i in range(200)])
    counts = torch.histc(depths, bins=4, min=0, max=1)
    assert (counts > 0.15 * depths.numel()).all(), counts  # every depth bucket is populated


def test_loss_on_all_trains_on_every_next_token():
    task = RetrievalQA(seq_len=64, num_facts=3, num_queries=2, vocab=64, loss_on_all=True)
    sample = task.sample(5)
    assert torch.equal(sample["labels"][:-1], sample["input_ids"][1:])
    assert sample["labels"][-1] == IGNORE_INDEX


@pytest.mark.parametrize("index", range(10))
def test_mqar_follows_the_zoology_layout(index):
    task = MQAR(seq_len=128, num_kv_pairs=8, num_queries=6, vocab=128)
    sample = task.sample(index)
    check_common_format(sample, task)
    ids = sample["input_ids"].numpy()
    keys, values = ids[0:16:2], ids[1:16:2]
    assert len(set(keys)) == 8 and len(set(values)) == 8
    assert all(task.vocab.role(int(k)) == "key" for k in keys)
    assert all(task.vocab.role(int(v)) == "value" for v in values)
    for pos, depth in zip(sample["query_positions"].tolist(), sample["depths"].tolist()):
        assert pos >= 16 and (pos - 16) % 2 == 0
        j = int(np.flatnonzero(keys == ids[pos])[0])
        assert sample["labels"][pos] == values[j] and depth == pytest.approx(j / 7)
    # Everything after the pairs that is not a query or its answer is filler noise.
    answered = set(sample["query_positions"].tolist()) | {p + 1 for p in sample["query_positions"].tolist()}
    assert all(task.vocab.role(int(ids[p])) == "filler" for p in range(16, 128) if p not in answered)


def test_mqar_query_gaps_follow_a_power_law():
    task = MQAR(seq_len=512, num_kv_pairs=4, vocab=128)
    positions = torch.cat([task.sample(i)["query_positions"] for i in range(300)]) - 8
    near, far = (positions < 62).sum(), (positions >= 442).sum()
    assert near > 2 * far  # power_a=0.01 favours short gaps


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_sits_at_the_requested_depth(depth):
    task = Needle(seq_len=100, depth=depth, key_len=2, vocab=64)
    sample = task.sample(0)
    check_common_format(sample, task)
    ids = sample["input_ids"].numpy()
    (start,) = np.flatnonzero(ids == FACT_ID)
    span = task.seq_len - 2 * task.fact_len - 1
    assert start - 1 == round(depth * span)
    assert sample["depths"].item() == pytest.approx((start - 1) / span)
    assert abs(sample["depths"].item() - depth) <= 0.5 / span + 1e-6
    assert ids[-task.fact_len] == QUERY_ID
    assert sample["labels"][-2] == ids[start + task.fact_len - 1]


# -- config errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, minimum",
    [
        (lambda: RetrievalQA(seq_len=60, num_facts=10, num_queries=5, key_len=2, vocab=256), 61),
        (lambda: MQAR(seq_len=30, num_kv_pairs=8, vocab=256), 32),
        (lambda: Needle(seq_len=8, key_len=2, vocab=64), 9),
    ],
)
def test_seq_len_too_short_names_the_field_and_minimum(make, minimum):
    with pytest.raises(ValueError, match=rf"seq_len=\d+ is too short.*seq_len >= {minimum}"):
        make()


def test_other_bad_configs_fail_fast_naming_the_field():
    with pytest.raises(ValueError, match="num_queries"):
        RetrievalQA(num_facts=2, num_queries=3)
    with pytest.raises(ValueError, match="num_facts"):
        RetrievalQA(seq_len=4096, num_facts=200, num_queries=1, key_len=1, vocab=64)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQAR(seq_len=4096, num_kv_pairs=256, vocab=512)
    with pytest.raises(ValueError, match="depth"):
        Needle(depth=1.5)
    with pytest.raises(ValueError, match="task="):
        SyntheticDataModule(task="nope")


# -- DataModule batches -----------------------------------------------------------------------


def test_datamodule_batches_stack_with_the_documented_keys():
    dm = SyntheticDataModule(
        "retrieval_qa", {"seq_len": 96, "num_facts": 4, "num_queries": 2, "vocab": 64}, batch_size=3, num_val_samples=7
    )
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "query_positions", "depths", "source_positions"}
    assert batch["input_ids"].shape == (3, 96) and batch["query_positions"].shape == (3, 2)
    assert dm.vocab_size == 64 and dm.pad_id == 0
    val_rows = sum(b["input_ids"].shape[0] for b in dm.val_dataloader())
    assert val_rows == 7  # eval keeps the partial last batch
    # Validation is generated from the val split, never from train indices.
    val_first = next(iter(dm.val_dataloader()))["input_ids"][0]
    assert torch.equal(val_first, dm.task.sample(0, "val", dm.seed)["input_ids"])
