"""Byte-level default tokenizer and the BPE training command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hydralm.data import TextDataModule, load_tokenizer
from hydralm.data.train_tokenizer import main as train_main

REPO = Path(__file__).resolve().parents[1]


def test_byte_level_default_is_lossless_and_offline():
    info = load_tokenizer(None)
    assert (info.vocab_size, info.pad_id, info.bos_id, info.eos_id) == (259, 0, 1, 2)
    text = "naïve café — 日本語 <eos> \t\n\x00"
    ids = info.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == [b + 3 for b in text.encode("utf-8")]  # a literal "<eos>" stays bytes
    assert info.tokenizer.decode(ids) == text


def test_the_byte_level_fast_encoding_gives_the_tokenizers_ids():
    """DocumentEncoder reads the default's ids from the UTF-8 bytes with numpy: the same ids, BOS / EOS framing
    and empty documents as encoding with the tokenizer itself (any text, multi-byte characters included)."""
    import dataclasses
    import random

    import numpy as np

    from hydralm.data.windows import DocumentEncoder

    info = load_tokenizer(None)
    rng = random.Random(0)
    alphabet = "ab \n\t\x00é日本語🙂<eos>"
    texts = ["", "x"] + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200))) for _ in range(50)]
    for add_bos, add_eos in ((True, True), (False, True), (False, False)):
        fast = DocumentEncoder(info, add_bos, add_eos).encode_batch(texts)
        slow = DocumentEncoder(dataclasses.replace(info, byte_offset=None), add_bos, add_eos).encode_batch(texts)
        assert all(a.dtype == np.int32 and np.array_equal(a, b) for a, b in zip(fast, slow, strict=True))
    # the check can fail: one more offset shifts every id
    wrong = DocumentEncoder(dataclasses.replace(info, byte_offset=4), True, True).encode_batch(texts[1:2])
    assert not np.array_equal(wrong[0], DocumentEncoder(info, True, True).encode_batch(texts[1:2])[0])


def test_missing_tokenizer_path_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_path="):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_train_tokenizer_command_writes_a_loadable_bpe(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    sentences = ["the quick brown fox jumps over the lazy dog", "a tokenizer learns merges from frequent pairs"]
    corpus.write_text("\n".join(json.dumps({"text": s + f" {i}"}) for i in range(200) for s in sentences))
    output = tmp_path / "data" / "tokenizer.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hydralm.data.train_tokenizer",
            "--input",
            str(corpus),
            "--vocab-size",
            "320",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert output.is_file() and "vocab_size=" in result.stdout

    info = load_tokenizer(str(output))
    assert (info.pad_id, info.bos_id, info.eos_id) == (0, 1, 2)  # same specials as the byte default
    assert 259 < info.vocab_size <= 320
    ids = info.tokenizer.encode("the quick brown fox", add_special_tokens=False).ids
    assert len(ids) < len("the quick brown fox")  # merges were learned
    assert info.tokenizer.decode(ids) == "the quick brown fox"

    dm = TextDataModule(str(corpus), tokenizer_path=str(output), seq_len=16, cache_dir=str(tmp_path / "hf"))
    assert dm.vocab_size == info.vocab_size
    dm.setup("fit")
    assert int(dm.dataset("train")[0]["input_ids"].max()) < dm.vocab_size


def test_train_tokenizer_rejects_bad_arguments(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--input", str(corpus), "--vocab-size", "100", "--output", str(tmp_path / "t.json")])
    assert exit_info.value.code == 2 and "vocab_size=100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--input", str(tmp_path / "missing.txt"), "--vocab-size", "300"])
    assert "does not exist" in capsys.readouterr().err
