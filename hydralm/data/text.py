"""Text DataModule: local txt/jsonl/parquet files or a streamed hub dataset, tokenised into rows of
``seq_len`` tokens that never mix two documents.

Document boundaries (policy in ``windows.py``). Neither the recurrent state (DeltaNet) nor attention
may carry information from one document into another, and the model has no in-row state reset, so
a row holds tokens of exactly one document: long documents are cut into ``seq_len`` windows, the last
window and short documents are padded *at the end* (pad inputs, ``-100`` labels). With a causal model
end padding cannot influence any real position and carries no loss. Cost: compute spent on padding
(``stats[split]["pad_fraction"]`` after ``setup``), large when documents are short relative to
``seq_len``, and windows after the first start without the document's earlier context. Packing
several short documents into one row would remove the padding but needs the reset the model lacks.

Splits: each document goes to train/val/test by a hash of its text (``corpus.document_split``), so
the splits are disjoint and stable under file order, sharding and seed. A corpus with too few documents
for that (a single text file read as one document) leaves val or test empty; then the token stream is
split by windows instead: leading windows train, then val, then test (map-style only).

Sharding and resume:
* map-style (local files, default): windows are tokenised once into the HF Arrow cache and indexed;
  ``ResumableDistributedSampler`` shards them over ranks without duplicates and restarts mid-epoch at
  the checkpointed position, exactly.
* streaming (``dataset_name``, or ``streaming=True``): ``datasets.distributed.split_dataset_by_node``
  gives each rank whole shards when ``n_shards % world_size == 0``; otherwise each rank reads the
  whole stream and keeps every ``world_size``-th document (no duplicates, but every rank pays the
  full read). Resume re-reads and skips what was trained on (``text_stream.py``): exact with the same
  world size, ``batch_size`` and ``num_workers``, approximate otherwise (with a warning). Ranks may
  run out of stream at different times, so streamed training should stop on ``max_steps``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from datasets.distributed import split_dataset_by_node
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from hydralm.data.corpus import (
    TXT_SAMPLE_BY,
    builder_for,
    check_text_field,
    check_utf8,
    document_split,
    open_corpus,
    resolve_data_files,
)
from hydralm.data.resumable import ResumableDataModule
from hydralm.data.synthetic import SPLITS, check_positive_int
from hydralm.data.text_stream import StreamingLoader, StreamingTextWindows
from hydralm.data.tokenizer import load_tokenizer
from hydralm.data.windows import DocumentEncoder, document_windows, window_to_row


def _windows_map(
    batch: dict[str, list], text_field: str, encoder: DocumentEncoder, seq_len: int, fractions: tuple[float, float]
) -> dict:
    texts = [t if isinstance(t, str) and t.strip() else "" for t in batch[text_field]]
    out: dict[str, list] = {"ids": [], "split": [], "predictions": []}
    for text, ids in zip(texts, encoder.encode_batch(texts)):
        if len(ids) < 2:  # empty document: nothing to predict
            continue
        split = document_split(text, *fractions)
        for window in document_windows(ids, seq_len):
            out["ids"].append(window)
            out["split"].append(split)
            out["predictions"].append(len(window) - 1)
    return out


class TextWindows(Dataset):
    """Map-style rows over an HF dataset of windows (memory-mapped Arrow, nothing held in RAM)."""

    def __init__(self, windows: datasets.Dataset, seq_len: int, pad_id: int) -> None:
        self.windows, self.seq_len, self.pad_id = windows, seq_len, pad_id

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return window_to_row(self.windows[int(index)]["ids"], self.seq_len, self.pad_id)


class TextDataModule(ResumableDataModule):
    """Language-modelling rows (``input_ids``, ``labels``) from text.

    Args:
        data_files: a file, directory or glob (or a list of them) of .txt / .jsonl / .json / .parquet.
        dataset_name / dataset_config / hub_split: a hub dataset, always streamed (needs network).
        text_field: column holding the text (jsonl/parquet/hub).
        txt_sample_by: what a document is in a .txt file: "line", "paragraph" (blank-line separated)
            or "document" (the whole file).
        tokenizer_path: a ``tokenizers`` JSON (e.g. from ``python -m hydralm.data.train_tokenizer``);
            None -> byte-level (vocab 259, no file).
        seq_len: tokens per row.
        val_fraction / test_fraction: share of documents (by content hash) in val / test.
        streaming: stream local files instead of building an indexed Arrow cache.
        shuffle: train order is a per-epoch permutation of windows (map-style) or a shuffle buffer of
            ``shuffle_buffer`` documents (streaming), seeded by ``seed``.
        cache_dir / num_proc: HF datasets cache and tokenisation processes (map-style).
        add_bos / add_eos: frame each document, so the model learns where documents start and end.
    """

    def __init__(
        self,
        data_files: str | Sequence[str] | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        hub_split: str = "train",
        text_field: str = "text",
        txt_sample_by: str = "document",
        tokenizer_path: str | None = None,
        seq_len: int = 1024,
        batch_size: int = 8,
        val_fraction: float = 0.01,
        test_fraction: float = 0.01,
        streaming: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 10_000,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        num_proc: int | None = None,
        add_bos: bool = True,
        add_eos: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        owner = type(self).__name__
        if (data_files is None) == (dataset_name is None):
            raise ValueError(f"{owner}: give exactly one of data_files (local files) or dataset_name (hub, streamed)")
        check_positive_int(owner, "seq_len", seq_len)
        check_positive_int(owner, "shuffle_buffer", shuffle_buffer)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{owner}.{name}={value!r} must be in [0, 1)")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"{owner}: val_fraction + test_fraction = {val_fraction + test_fraction} leaves no train data"
            )
        if txt_sample_by not in TXT_SAMPLE_BY:
            raise ValueError(f"{owner}.txt_sample_by={txt_sample_by!r} must be one of {TXT_SAMPLE_BY}")
        # Resolved now so a wrong path fails at construction, not minutes later in setup().
        self.files = resolve_data_files(data_files, f"{owner}.data_files") if data_files is not None else None
        if self.files is not None:
            builder_for(self.files, f"{owner}.data_files")
            check_utf8(self.files, f"{owner}.data_files")
        self.dataset_name, self.dataset_config, self.hub_split = dataset_name, dataset_config, hub_split
        self.text_field, self.txt_sample_by, self.tokenizer_path = text_field, txt_sample_by, tokenizer_path
        self.seq_len, self.fractions = seq_len, (val_fraction, test_fraction)
        self.streaming = streaming or dataset_name is not None
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.cache_dir, self.num_proc, self.add_bos, self.add_eos = cache_dir, num_proc, add_bos, add_eos
        self.tokenizer_info = load_tokenizer(tokenizer_path)  # vocab_size is needed before setup()
        self._encoder = DocumentEncoder(self.tokenizer_info, add_bos, add_eos)
        self._windows: dict[str, datasets.Dataset] | None = None
        self.stats: dict[str, Any] = {}

    # -- what the model needs to know --------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer_info.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer_info.pad_id

    def data_fingerprint(self) -> str:
        source = "\n".join(self.files) if self.files else f"{self.dataset_name}/{self.dataset_config}/{self.hub_split}"
        key = (
            f"{source}|{self.text_field}|{self.txt_sample_by}|{self.tokenizer_path}|{self.seq_len}|{self.fractions}|"
            f"{self.add_bos}|{self.add_eos}|{self.seed}|{self.shuffle}|{self.streaming}"
        )
        return "text:" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest()

    # -- resume (streaming also needs the loader layout to map a position to each worker) ---------
    def _stream_layout(self) -> list[int]:
        return [self.rank_and_world()[1], self.batch_size, self.num_workers]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.streaming:
            state["stream_layout"] = self._stream_layout()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("stream_layout")
        if self.streaming and self._consumed and saved is not None and list(saved) != self._stream_layout():
            rank_zero_warn(
                f"{type(self).__name__}: resuming a stream with [world_size, batch_size, num_workers]="
                f"{self._stream_layout()} instead of {list(saved)}; the data position is approximate"
            )

    # -- map-style pipeline ----------------------------------------------------------------------
    def _build_windows(self) -> dict[str, datasets.Dataset]:
        raw = open_corpus(self.files, txt_sample_by=self.txt_sample_by, cache_dir=self.cache_dir)
        check_text_field(raw, self.text_field)
        windows = raw.map(
            _windows_map,
            batched=True,
            remove_columns=raw.column_names,
            num_proc=self.num_proc,
            fn_kwargs={
                "text_field": self.text_field,
                "encoder": self._encoder,
                "seq_len": self.seq_len,
                "fractions": self.fractions,
            },
            desc="tokenising into windows",
        )
        if len(windows) == 0:
            raise ValueError(
                f"{type(self).__name__}.data_files={self.files} yields no text: every document in field "
                f"{self.text_field!r} is empty"
            )
        splits = {
            name: windows.filter(lambda s, k=sid: [x == k for x in s], input_columns="split", batched=True)
            for name, sid in SPLITS.items()
        }
        empty = [name for name, fraction in zip(("val", "test"), self.fractions) if fraction > 0 and len(splits[name]) == 0]
        if empty:
            splits = self._split_by_position(windows, empty)
        if len(splits["train"]) == 0:
            raise ValueError(
                f"{type(self).__name__}: the train split is empty (all {len(windows)} windows fell in val/test); "
                f"lower val_fraction/test_fraction={self.fractions} or add documents"
            )
        return splits

    def _split_by_position(self, windows: datasets.Dataset, empty: list[str]) -> dict[str, datasets.Dataset]:
        """Too few documents for the hash split (one file read as one document, say): split the token stream
        instead, in corpus order: train = the leading windows, then val, then test (at least one window each
        when its fraction is > 0). Deterministic; a document may then span train and val, as in any
        single-text split."""
        n = len(windows)
        sizes = [max(1, round(n * f)) if f > 0 else 0 for f in self.fractions]
        n_train = n - sum(sizes)
        if n_train < 1:
            raise ValueError(
                f"{type(self).__name__}.data_files={self.files}: {n} window(s) of seq_len={self.seq_len} are too few "
                f"for train + val + test; add text, lower seq_len, or set val_fraction/test_fraction=0"
            )
        bounds = [0, n_train, n_train + sizes[0], n]
        rank_zero_info(
            f"{type(self).__name__}: hashing its documents put none in {' and '.join(empty)}; splitting the token "
            f"stream by windows instead: train = windows [0, {bounds[1]}), val = [{bounds[1]}, {bounds[2]}), "
            f"test = [{bounds[2]}, {n})"
        )
        return {name: windows.select(range(bounds[i], bounds[i + 1])) for i, name in enumerate(SPLITS)}

    def prepare_data(self) -> None:
        # Rank 0 of each node tokenises once into the HF cache; setup() on every rank then hits it.
        if not self.streaming:
            self._build_windows()

    def setup(self, stage: str | None = None) -> None:
        if self.streaming or self._windows is not None:
            return
        self._windows = self._build_windows()
        for name, ds in self._windows.items():
            # Summed in Arrow: a numpy-formatted column is built row by row (32 s for 200k windows, datasets 5.2)
            predictions = int(pc.sum(ds.with_format("arrow")["predictions"]).as_py()) if len(ds) else 0
            self.stats[name] = {
                "windows": len(ds),
                "pad_fraction": 1.0 - predictions / (len(ds) * self.seq_len) if len(ds) else 0.0,
            }
        rank_zero_info(f"{type(self).__name__}: {self.stats}")

    def dataset(self, split: str) -> TextWindows:
        if self._windows is None:
            self.setup()
        return TextWindows(self._windows[split], self.seq_len, self.pad_id)

    # -- streaming pipeline ----------------------------------------------------------------------
    def _stream(self, split: str, train: bool) -> StreamingTextWindows:
        stream = open_corpus(
            self.files,
            self.dataset_name,
            self.dataset_config,
            self.hub_split,
            streaming=True,
            txt_sample_by=self.txt_sample_by,
            cache_dir=self.cache_dir,
        )
        check_text_field(stream, self.text_field)
        sid, field, fractions = SPLITS[split], self.text_field, self.fractions
        stream = stream.filter(
            lambda row: isinstance(row[field], str) and document_split(row[field], *fractions) == sid
        )
        if train and self.shuffle:
            # Same seed on every rank, so all ranks agree on the shard order before splitting it.
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        rank, world = self.rank_and_world()
        stream = split_dataset_by_node(stream, rank=rank, world_size=world)
        epoch = self.epoch_for_new_loader() if train else 0
        skip = 0
        if train and epoch == self._epoch:
            skip = self._consumed // world // self.batch_size
        return StreamingTextWindows(
            stream, field, self._encoder, self.seq_len, self.pad_id, self.batch_size, skip, epoch
        )

    def _streaming_loader(self, split: str, train: bool) -> DataLoader:
        return StreamingLoader(
            self._stream(split, train),
            batch_size=self.batch_size,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            # Fresh workers per epoch: they must copy the per-epoch skip/epoch set by on_new_iterator.
            persistent_workers=False,
        )

    # -- loaders ----------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            return self._streaming_loader("train", train=True)
        dataset = self.dataset("train")
        return self.make_loader(dataset, self.train_sampler(len(dataset), self.shuffle), train=True)

    def _eval_loader(self, split: str) -> DataLoader | list:
        if self.streaming:
            return self._streaming_loader(split, train=False)
        dataset = self.dataset(split)
        if len(dataset) == 0:
            rank_zero_warn(f"{type(self).__name__}: the {split} split is empty; skipping it")
            return []
        return self.make_loader(dataset, self.eval_sampler(len(dataset)), train=False)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")
