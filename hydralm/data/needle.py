"""Needle in a haystack: one fact at a chosen depth of filler, one question at the very end.

Layout (``F = key_len + 2``)::

    [BOS] filler ... [FACT k1 k2 v] ... filler [QUERY k1 k2 v]

``depth`` places the fact's first token at ``1 + round(depth * (H - F))`` where ``H = seq_len - F - 1``
is the haystack length, so ``depth=0`` is right after BOS and ``depth=1`` is right before the query;
``depth=None`` draws it uniformly per sample. The recorded depth is the realised one
(``offset / (H - F)``), within ``0.5 / (H - F)`` of the requested depth, so a needle sweep and
retrieval_qa's depth buckets mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hydralm.data.synthetic import SyntheticTask, check_positive_int, distinct_keys, fact_tokens, filler
from hydralm.data.vocab import BOS_ID, FACT_ID, QUERY_ID, SyntheticVocab, as_vocab


@dataclass
class Needle(SyntheticTask):
    seq_len: int = 512
    depth: float | None = 0.5
    key_len: int = 2
    vocab: SyntheticVocab | int = 512
    loss_on_all: bool = False

    name: ClassVar[str] = "needle"
    num_queries: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.vocab = as_vocab(self.vocab)
        owner = type(self).__name__
        for field_name in ("seq_len", "key_len"):
            check_positive_int(owner, field_name, getattr(self, field_name))
        if self.depth is not None and not (isinstance(self.depth, (int, float)) and 0.0 <= self.depth <= 1.0):
            raise ValueError(f"{owner}.depth={self.depth!r} must be a float in [0, 1] or None (random depth)")
        if self.seq_len < self.min_seq_len:
            raise ValueError(
                f"{owner}.seq_len={self.seq_len} is too short: BOS, the needle and the query "
                f"({self.fact_len} tokens each) need seq_len >= {self.min_seq_len}"
            )

    @property
    def fact_len(self) -> int:
        return self.key_len + 2

    @property
    def min_seq_len(self) -> int:
        return 1 + 2 * self.fact_len

    def _generate(self, rng: np.random.Generator):
        vocab, F = self.vocab, self.fact_len
        span = (self.seq_len - F - 1) - F  # number of start offsets minus one
        depth = rng.random() if self.depth is None else float(self.depth)
        offset = int(round(depth * span))
        key = distinct_keys(rng, vocab, 1, self.key_len)[0]
        value = int(rng.integers(vocab.value_start, vocab.filler_start))

        tokens = filler(rng, vocab, self.seq_len)
        tokens[0] = BOS_ID
        tokens[1 + offset : 1 + offset + F] = fact_tokens(FACT_ID, key, value)
        query_at = self.seq_len - F
        tokens[query_at:] = fact_tokens(QUERY_ID, key, value)
        realised = offset / span if span > 0 else 0.0
        source = np.array([offset + F])  # the needle's value token
        return tokens, np.array([query_at + self.key_len]), np.array([value]), np.array([realised]), source
