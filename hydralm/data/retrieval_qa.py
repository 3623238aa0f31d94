"""Multi-fact long-context QA: K facts hidden at random depths in filler, Q questions at the end.

Layout (``F = key_len + 2`` tokens per fact and per query)::

    [BOS] filler .. [FACT k1 k2 v] .. filler .. [FACT k1 k2 v] .. filler | [QUERY k1 k2 v] x Q
          \\_____________ haystack: positions [1, seq_len - Q*F) _______/ \\__ queries ___/

The model is scored at the last key token of each query (its next token is the value), so
``labels[pos] = value`` there and ``-100`` elsewhere (unless ``loss_on_all``). Keys are distinct
within a sample (so every question has one answer); values may repeat (so the answer cannot be
inferred by elimination). Facts never overlap; their start offsets are i.i.d. uniform over the
free slack, then sorted, so every depth is equally likely.

``depth`` of a fact = ``(start - 1) / (H - F)`` where ``H`` is the haystack length: 0 = the first
position a fact can take, 1 = the last one before the queries. This is the quantity accuracy is
bucketed by (0-25/25-50/50-75/75-100).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hydralm.data.synthetic import SyntheticTask, check_positive_int, distinct_keys, fact_tokens, filler
from hydralm.data.vocab import BOS_ID, FACT_ID, QUERY_ID, SyntheticVocab, as_vocab


@dataclass
class RetrievalQA(SyntheticTask):
    """Config + generator. ``vocab`` is an int vocab_size (default layout) or a ``SyntheticVocab``."""

    seq_len: int = 512
    num_facts: int = 8
    num_queries: int = 4
    key_len: int = 2  # 2 tokens -> num_keys**2 distinct keys from a small key alphabet
    vocab: SyntheticVocab | int = 512
    loss_on_all: bool = False  # also train on every next token (filler included), not just answers

    name: ClassVar[str] = "retrieval_qa"

    def __post_init__(self) -> None:
        self.vocab = as_vocab(self.vocab)
        owner = type(self).__name__
        for field_name in ("seq_len", "num_facts", "num_queries", "key_len"):
            check_positive_int(owner, field_name, getattr(self, field_name))
        if self.num_queries > self.num_facts:
            raise ValueError(
                f"{owner}.num_queries={self.num_queries} must be <= num_facts={self.num_facts} "
                "(each query asks about a different fact)"
            )
        if self.vocab.num_keys**self.key_len < self.num_facts:
            raise ValueError(
                f"{owner}.num_facts={self.num_facts} needs that many distinct keys, but key_len={self.key_len} "
                f"over {self.vocab.num_keys} key tokens gives only {self.vocab.num_keys**self.key_len}"
            )
        if self.seq_len < self.min_seq_len:
            raise ValueError(
                f"{owner}.seq_len={self.seq_len} is too short: {self.num_facts} facts and {self.num_queries} "
                f"queries of {self.fact_len} tokens each plus BOS need seq_len >= {self.min_seq_len}"
            )

    @property
    def fact_len(self) -> int:
        return self.key_len + 2

    @property
    def min_seq_len(self) -> int:
        return 1 + (self.num_facts + self.num_queries) * self.fact_len

    @property
    def haystack(self) -> tuple[int, int]:
        """``[start, end)`` of the region where facts live."""
        return 1, self.seq_len - self.num_queries * self.fact_len

    def _generate(self, rng: np.random.Generator):
        vocab, F, K = self.vocab, self.fact_len, self.num_facts
        keys = distinct_keys(rng, vocab, K, self.key_len)
        values = rng.integers(vocab.value_start, vocab.filler_start, size=K, dtype=np.int64)
        hay_start, hay_end = self.haystack
        slack = (hay_end - hay_start) - K * F
        starts = hay_start + np.sort(rng.integers(0, slack + 1, size=K)) + np.arange(K) * F

        tokens = filler(rng, vocab, self.seq_len)
        tokens[0] = BOS_ID
        for j in range(K):
            tokens[starts[j] : starts[j] + F] = fact_tokens(FACT_ID, keys[j], values[j])

        asked = rng.choice(K, size=self.num_queries, replace=False)
        positions = np.empty(self.num_queries, dtype=np.int64)
        for q, j in enumerate(asked):
            at = hay_end + q * F
            tokens[at : at + F] = fact_tokens(QUERY_ID, keys[j], values[j])
            positions[q] = at + self.key_len  # last key token: its next token is the answer
        span = (hay_end - hay_start) - F
        depths = (starts[asked] - hay_start) / span if span > 0 else np.zeros(self.num_queries)
        return tokens, positions, values[asked], depths, starts[asked] + F - 1
