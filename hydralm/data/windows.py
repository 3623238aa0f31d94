"""How a document becomes training rows; the one place the document-boundary policy lives.

A document is framed as ``[BOS] tokens [EOS]`` and cut into windows of ``seq_len`` predictions:
window ``w`` holds ids ``[w*seq_len, (w+1)*seq_len]`` (``seq_len`` inputs plus the next id, the last
input's label), so consecutive windows overlap by one id and every next token of the document is
predicted exactly once. A short last window is padded at the end (``pad_id`` inputs, ``-100``
labels). A row never holds ids of two documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hydralm.data.synthetic import IGNORE_INDEX
from hydralm.data.tokenizer import TokenizerInfo


def document_windows(ids: Sequence[int], seq_len: int) -> list[Sequence[int]]:
    """Cut one document's ids into windows of at most ``seq_len + 1`` ids (overlapping by one)."""
    return [ids[start : start + seq_len + 1] for start in range(0, len(ids) - 1, seq_len)]


def window_to_row(window: Sequence[int], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    window = np.asarray(window, dtype=np.int64)
    n = len(window) - 1  # predictions in this window
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    input_ids[:n] = window[:-1]
    labels[:n] = window[1:]
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


class DocumentEncoder:
    """Text -> document ids with BOS/EOS, as int32 arrays; picklable so HF ``map`` and DataLoader workers can use
    it. The byte-level default skips the tokenizer: its ids are the UTF-8 bytes plus a fixed offset, read with
    numpy (a 30 MB document in about a second; through the tokenizer and its Python lists, over a minute)."""

    def __init__(self, info: TokenizerInfo, add_bos: bool, add_eos: bool) -> None:
        self.tokenizer, self.byte_offset = info.tokenizer, info.byte_offset
        self.prefix = np.array([info.bos_id] if add_bos and info.bos_id is not None else [], dtype=np.int32)
        self.suffix = np.array([info.eos_id] if add_eos and info.eos_id is not None else [], dtype=np.int32)

    def _frame(self, ids: np.ndarray) -> np.ndarray:
        return np.concatenate([self.prefix, ids, self.suffix]) if len(ids) else ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.byte_offset is not None:
            raw = (np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts)
            return [self._frame(ids.astype(np.int32) + self.byte_offset) for ids in raw]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [self._frame(np.asarray(enc.ids, dtype=np.int32)) for enc in encodings]
