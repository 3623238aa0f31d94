"""Data layer: synthetic long-context tasks, text corpora, and their Lightning DataModules.

Every DataModule yields dict batches with ``input_ids`` (B, N) int64 and ``labels`` (B, N) int64
aligned with the logits (``labels[b, t]`` is the target of the prediction at ``t``, -100 = no loss);
synthetic tasks add ``query_positions`` (B, Q) int64 and ``depths`` (B, Q) float32. See docs/data.md.

Names are imported on first use: the generators and ``python -m hydralm.data.train_tokenizer`` do not
need Lightning, whose import alone takes seconds.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SyntheticVocab": "vocab",
    "PAD_ID": "vocab",
    "BOS_ID": "vocab",
    "EOS_ID": "vocab",
    "FACT_ID": "vocab",
    "QUERY_ID": "vocab",
    "SyntheticTask": "synthetic",
    "SyntheticDataset": "synthetic",
    "IGNORE_INDEX": "synthetic",
    "SPLITS": "synthetic",
    "RetrievalQA": "retrieval_qa",
    "MQAR": "mqar",
    "Needle": "needle",
    "ResumableDistributedSampler": "sampler",
    "ResumableDataModule": "resumable",
    "SyntheticDataModule": "datamodule",
    "TASKS": "datamodule",
    "build_task": "datamodule",
    "TextDataModule": "text",
    "load_tokenizer": "tokenizer",
    "byte_level_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hydralm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hydralm.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
