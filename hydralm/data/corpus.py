"""Find and open a text corpus: local txt/jsonl/parquet files (path, directory or glob) or a hub name.

Shared by the text DataModule and the tokenizer-training command so both read documents the same
way. Errors are raised here, before any tokenisation, with the offending argument named.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

# File suffix -> HF datasets packaged builder. Compression suffixes are stripped first (HF
# decompresses on the fly).
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
TXT_SAMPLE_BY = ("line", "paragraph", "document")
# Formats HF reads as UTF-8 text. Up front only the head of the first few files is checked (a binary file given
# by mistake shows at once); a bad byte further in is named when HF fails on it (``open_corpus``).
TEXT_SUFFIXES = (".txt", ".text", ".jsonl", ".json")
UTF8_CHECK_BYTES = 1 << 16
UTF8_CHECK_FILES = 64


def _suffix(path: str) -> str:
    name = path.lower()
    for ext in COMPRESSION:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return os.path.splitext(name)[1]


def resolve_data_files(data_files: str | Sequence[str], owner: str = "data_files") -> list[str]:
    """Expand paths, directories (recursively, supported suffixes only) and globs to a sorted file list."""
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not patterns:
        raise ValueError(f"{owner} is empty: give a file, a directory or a glob of txt/jsonl/parquet files")
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            found = [str(p) for p in Path(pattern).rglob("*") if p.is_file() and _suffix(str(p)) in BUILDERS]
        elif glob.has_magic(pattern):
            found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        else:
            found = [pattern] if os.path.isfile(pattern) else []
        if not found:
            raise FileNotFoundError(f"{owner}={str(pattern)!r} does not exist or matches no txt/jsonl/parquet file")
        files.extend(found)
    return sorted(set(files))


def builder_for(files: Sequence[str], owner: str = "data_files") -> str:
    kinds = {_suffix(f) for f in files}
    unknown = sorted(k for k in kinds if k not in BUILDERS)
    if unknown:
        raise ValueError(f"{owner}: unsupported file type(s) {unknown}; supported: {sorted(BUILDERS)}")
    builders = {BUILDERS[k] for k in kinds}
    if len(builders) > 1:
        raise ValueError(f"{owner} mixes file types {sorted(kinds)}: give one format per DataModule")
    return builders.pop()


def _utf8_error(path: str, limit: int | None = None) -> str | None:
    """Why ``path`` (its first ``limit`` bytes, or all of it) is not UTF-8, or None if it is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(min(1 << 20, limit or 1 << 20)):
            try:
                decoder.decode(chunk, final=False)
            except UnicodeDecodeError as err:
                return f"UnicodeDecodeError near byte {offset + err.start}: {err.reason}"
            offset += len(chunk)
            if limit is not None and offset >= limit:
                return None
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        return f"UnicodeDecodeError at the end of the file: {err.reason}"
    return None


def _plain_text_files(files: Sequence[str]) -> list[str]:
    return [f for f in files if os.path.splitext(f.lower())[1] in TEXT_SUFFIXES]  # compressed files end otherwise


def not_utf8_message(path: str, why: str, owner: str = "data_files") -> str:
    return (
        f"{owner}: {path} is not UTF-8 text ({why}); is it a binary file? Give txt/jsonl/parquet files "
        "(convert other encodings to UTF-8 first, e.g. iconv -t utf-8)"
    )


def check_utf8(files: Sequence[str], owner: str = "data_files") -> None:
    """ValueError naming the first text file whose head is not UTF-8 (cheap: a few KiB of a few files)."""
    for path in _plain_text_files(files)[:UTF8_CHECK_FILES]:
        why = _utf8_error(path, UTF8_CHECK_BYTES)
        if why is not None:
            raise ValueError(not_utf8_message(path, why, owner))


def open_corpus(
    data_files: str | Sequence[str] | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    hub_split: str = "train",
    streaming: bool = False,
    txt_sample_by: str = "document",
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Exactly one of ``data_files`` / ``dataset_name``. A hub name is always streamed (no full download)."""
    if (data_files is None) == (dataset_name is None):
        raise ValueError("give exactly one of data_files (local txt/jsonl/parquet) or dataset_name (hub, streamed)")
    if dataset_name is not None:
        return datasets.load_dataset(dataset_name, dataset_config, split=hub_split, streaming=True, cache_dir=cache_dir)
    if txt_sample_by not in TXT_SAMPLE_BY:
        raise ValueError(f"txt_sample_by={txt_sample_by!r} must be one of {TXT_SAMPLE_BY}")
    files = resolve_data_files(data_files)
    builder = builder_for(files)
    check_utf8(files)
    kwargs = {"sample_by": txt_sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(
            builder, data_files=files, split="train", streaming=streaming, cache_dir=cache_dir, **kwargs
        )
    except DatasetGenerationError as err:
        # HF names neither the file nor the byte; find them (only on this error path: it reads every file).
        if isinstance(err.__cause__, UnicodeDecodeError):
            for path in _plain_text_files(files):
                why = _utf8_error(path)
                if why is not None:
                    raise ValueError(not_utf8_message(path, why)) from None
        raise


def check_text_field(ds: datasets.Dataset | datasets.IterableDataset, text_field: str) -> None:
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"text_field={text_field!r} is not a column of the corpus; columns: {columns}")


def iter_texts(ds: datasets.Dataset | datasets.IterableDataset, text_field: str) -> Iterator[str]:
    for row in ds:
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            yield text


def document_split(text: str, val_fraction: float, test_fraction: float) -> int:
    """0=train, 1=val, 2=test, from the document's content only.

    Content hashing (not row order, not the seed) keeps a document in the same split whatever the
    file order, sharding or training seed, and sends exact duplicates to the same split, so no
    document leaks from train into val/test through a duplicate.
    """
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    if u < val_fraction:
        return 1
    if u < val_fraction + test_fraction:
        return 2
    return 0
