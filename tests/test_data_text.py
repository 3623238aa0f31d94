"""Text DataModule: rows never mix documents, pads carry no loss, splits are disjoint, bad input fails."""

from __future__ import annotations

import json
import string

import pytest
import torch

from hydralm.data import IGNORE_INDEX, TextDataModule
from hydralm.data.corpus import document_split

SEQ_LEN = 8
LETTERS = string.ascii_letters + string.digits  # one distinct byte per document
BOS, EOS, PAD = 1, 2, 0


def letter_of(token: int) -> str:
    return chr(token - 3)  # byte-level default: byte b -> id b + 3


@pytest.fixture
def docs():
    # Lengths straddle the window size: shorter, equal, one over, multiples, and an empty document.
    lengths = [1, 5, 6, 7, 8, 9, 15, 16, 17, 23, 24, 25, 40] + list(range(2, 30))
    return {LETTERS[i]: LETTERS[i] * n for i, n in enumerate(lengths[: len(LETTERS)])}


@pytest.fixture
def jsonl(tmp_path, docs):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": text, "id": i} for i, text in enumerate(docs.values())] + [{"text": "", "id": -1}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def make(path, tmp_path, **kwargs):
    kwargs = {
        "seq_len": SEQ_LEN,
        "batch_size": 4,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "cache_dir": str(tmp_path / "hf"),
        **kwargs,
    }
    return TextDataModule(str(path), **kwargs)


def rows_of(dm, split):
    if dm.streaming:
        return [
            {"input_ids": ids, "labels": labels}
            for b in (dm.train_dataloader() if split == "train" else dm._streaming_loader(split, train=False))
            for ids, labels in zip(b["input_ids"], b["labels"])
        ]
    ds = dm.dataset(split)
    return [ds[i] for i in range(len(ds))]


def check_row(row) -> str:
    """Assert the row's invariants and return the document letter it belongs to."""
    ids, labels = row["input_ids"], row["labels"]
    assert ids.shape == labels.shape == (SEQ_LEN,) and ids.dtype == labels.dtype == torch.int64
    real = labels != IGNORE_INDEX
    n = int(real.sum())
    assert n >= 1 and bool(real[:n].all()), "loss positions are a prefix; padding only at the end"
    assert (ids[n:] == PAD).all() and (labels[n:] == IGNORE_INDEX).all()
    assert torch.equal(labels[: n - 1], ids[1:n]), "labels[t] is the token at t + 1"
    content = {letter_of(t) for t in ids[:n].tolist() if t != BOS} | {
        letter_of(t) for t in labels[:n].tolist() if t != EOS
    }
    assert len(content) == 1, f"row mixes documents: {content}"
    return content.pop()


@pytest.mark.parametrize("streaming", [False, True])
def test_rows_never_cross_documents_and_rebuild_every_document(jsonl, tmp_path, docs, streaming):
    dm = make(jsonl, tmp_path, streaming=streaming, shuffle=False)
    assert dm.vocab_size == 259 and dm.pad_id == PAD
    rebuilt: dict[str, list[int]] = {}
    split_of: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for row in rows_of(dm, split):
            letter = check_row(row)
            assert split_of.setdefault(letter, split) == split, "a document is in two splits"
            n = int((row["labels"] != IGNORE_INDEX).sum())
            window = row["input_ids"][:n].tolist() + [int(row["labels"][n - 1])]  # n inputs + last label
            tokens = rebuilt.setdefault(letter, [])
            if tokens:  # consecutive windows of a document overlap by exactly one id
                assert tokens[-1] == window[0]
                window = window[1:]
            tokens += window
    # Windows in order give back [BOS] document [EOS], every document exactly once (the empty one dropped).
    for letter, text in docs.items():
        framed = [BOS] + [ord(c) + 3 for c in text] + [EOS]
        assert rebuilt[letter] == framed, letter
    assert set(rebuilt) == set(docs)
    # The split is the document's content hash, independent of everything else.
    names = {0: "train", 1: "val", 2: "test"}
    assert all(split_of[letter] == names[document_split(text, 0.2, 0.2)] for letter, text in docs.items())
    assert set(split_of.values()) == {"train", "val", "test"}


def test_batches_and_padding_stats(jsonl, tmp_path):
    dm = make(jsonl, tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (4, SEQ_LEN)
    assert 0.0 < dm.stats["train"]["pad_fraction"] < 1.0


def test_paragraphs_of_a_txt_file_are_documents(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("aaaaaaaaaaaa\naaa\n\nbbbbbbb\n\nccccccccccccccccccc\n")
    dm = make(path, tmp_path, txt_sample_by="paragraph", val_fraction=0.0, test_fraction=0.0)
    letters = [check_row_allowing_newlines(r) for r in rows_of(dm, "train")]
    assert set(letters) == {"a", "b", "c"}


def check_row_allowing_newlines(row) -> str:
    real = row["labels"] != IGNORE_INDEX
    tokens = set(row["input_ids"][real].tolist()) | set(row["labels"][real].tolist())
    content = {letter_of(t) for t in tokens if t not in (BOS, EOS) and letter_of(t) != "\n"}
    assert len(content) == 1, content
    return content.pop()


def test_ranks_get_disjoint_rows(tmp_path, monkeypatch):
    # Every window distinct (counting text), so equal rows could only come from a duplicated index.
    path = tmp_path / "numbers.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": " ".join(map(str, range(100 * i, 100 * i + 3 * i + 5)))}) for i in range(20))
    )
    for streaming in (False, True):
        dm = make(path, tmp_path, streaming=streaming, val_fraction=0.0, test_fraction=0.0, batch_size=1)
        single = {tuple(b["input_ids"][0].tolist()) for b in dm.train_dataloader()}
        seen = []
        for rank in range(2):
            monkeypatch.setattr(dm, "rank_and_world", lambda rank=rank: (rank, 2))
            rows = [tuple(b["input_ids"][0].tolist()) for b in dm.train_dataloader()]
            assert len(rows) == len(set(rows))
            seen.append(set(rows))
        monkeypatch.undo()
        assert seen[0] and seen[1] and not seen[0] & seen[1], f"streaming={streaming}"
        assert len(single - (seen[0] | seen[1])) <= 1, "only the odd tail window may be dropped"


def test_missing_or_empty_corpus_fails_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_files=.*does not exist"):
        TextDataModule(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="matches no"):
        TextDataModule(str(tmp_path / "*.parquet"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(ValueError, match="yields no text"):
        make(empty, tmp_path).setup("fit")
    with pytest.raises(ValueError, match="text_field='body'"):
        make(empty, tmp_path, text_field="body").setup("fit")
    with pytest.raises(ValueError, match="exactly one of data_files"):
        TextDataModule()
    with pytest.raises(ValueError, match="val_fraction"):
        make(empty, tmp_path, val_fraction=1.5)
    (tmp_path / "odd.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        TextDataModule(str(tmp_path / "odd.csv"))


def test_a_train_split_smaller_than_one_batch_is_an_error_not_an_empty_epoch(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "just a few words"}\n')
    dm = make(path, tmp_path, batch_size=16, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        dm.train_dataloader()


def test_a_binary_file_fails_naming_the_file_and_the_decode_error(tmp_path, monkeypatch):
    from hydralm.data import corpus

    binary = tmp_path / "model.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ValueError) as err:
        TextDataModule(str(binary))
    message = str(err.value)
    assert str(binary) in message and "is not UTF-8 text (UnicodeDecodeError near byte 0" in message
    assert "\n" not in message
    # A bad byte past the checked head is named when the datasets library fails on it, not as its 59-line
    # DatasetGenerationError.
    late = tmp_path / "late.txt"
    late.write_bytes(b"fine text\n" * 20 + b"\xff\xfe oops")
    monkeypatch.setattr(corpus, "UTF8_CHECK_BYTES", 16)
    dm = make(late, tmp_path)
    with pytest.raises(ValueError, match=r"late.txt is not UTF-8 text \(UnicodeDecodeError near byte 200"):
        dm.setup("fit")


def test_a_single_document_corpus_is_split_by_windows_of_its_token_stream(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("".join(LETTERS[i % len(LETTERS)] * 7 + "\n" for i in range(60)))  # one document, 480 bytes
    dm = make(book, tmp_path, val_fraction=0.1, test_fraction=0.05)  # txt_sample_by="document"
    dm.setup("fit")
    sizes = {split: dm.stats[split]["windows"] for split in ("train", "val", "test")}
    total = sum(sizes.values())
    assert sizes["val"] == round(total * 0.1) and sizes["test"] == round(total * 0.05) and sizes["train"] > 0
    # In stream order: train is the leading windows, then val, then test; together the whole document once.
    rows = [r for split in ("train", "val", "test") for r in rows_of(dm, split)]
    ids = [t for r in rows for t, label in zip(r["input_ids"].tolist(), r["labels"].tolist()) if label != -100]
    text = "".join(chr(t - 3) for t in ids if t not in (BOS, EOS))
    assert text == book.read_text()
    again = make(book, tmp_path, val_fraction=0.1, test_fraction=0.05)
    assert [r["input_ids"].tolist() for r in rows_of(again, "val")] == [
        r["input_ids"].tolist() for r in rows_of(dm, "val")
    ]
    with pytest.raises(ValueError, match="too few for train \\+ val \\+ test"):
        make(book, tmp_path, seq_len=400, val_fraction=0.1, test_fraction=0.1).setup("fit")
