"""Multi-query associative recall (MQAR), following Zoology (Arora, Eyuboglu et al. 2023).

Layout, as in Zoology's ``multiquery_ar``::

    k1 v1 k2 v2 ... kK vK | noise .. kq vq .. noise .. kq' vq' .. noise
    \\__ 2K tokens: pairs _/ \\___ queries on even offsets, power-law spaced ____/

Keys and values are single tokens, drawn without replacement (distinct keys *and* values, as in
Zoology). Query ``q`` sits at ``2K + 2*gap_q``, where the ``gap``s are drawn without replacement
with ``p(gap=g) ~ g**(power_a - 1)`` (``power_a=0.01``: Zoology's default; most queries land soon
after the pairs, a long tail far away - the bigram-recurrence statistics of real text). Each key is
queried at most once.

Two deliberate differences from Zoology, both to fit the shared batch format:
- the answer value is written into the input right after the query key (Zoology leaves a noise
  token there), so ``labels[pos] == input_ids[pos + 1]`` like every other task and a model trained
  with ``loss_on_all`` sees a consistent "key value" grammar;
- noise is drawn from the filler block, never from keys/values (Zoology draws it from the whole
  vocabulary), so a stray key in the noise cannot be mistaken for a query.

``depth`` of a pair = its index among the K pairs / (K - 1): 0 = first pair, 1 = last pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hydralm.data.synthetic import SyntheticTask, check_positive_int, filler
from hydralm.data.vocab import SyntheticVocab, as_vocab


@dataclass
class MQAR(SyntheticTask):
    """Config + generator. ``num_queries=None`` queries every key (Zoology's setting)."""

    seq_len: int = 256
    num_kv_pairs: int = 16
    num_queries: int | None = None  # type: ignore[assignment]  # resolved to an int in __post_init__
    power_a: float = 0.01
    vocab: SyntheticVocab | int = 512
    loss_on_all: bool = False

    name: ClassVar[str] = "mqar"

    def __post_init__(self) -> None:
        self.vocab = as_vocab(self.vocab)
        owner = type(self).__name__
        if self.num_queries is None:
            self.num_queries = self.num_kv_pairs
        for field_name in ("seq_len", "num_kv_pairs", "num_queries"):
            check_positive_int(owner, field_name, getattr(self, field_name))
        if self.num_queries > self.num_kv_pairs:
            raise ValueError(
                f"{owner}.num_queries={self.num_queries} must be <= num_kv_pairs={self.num_kv_pairs} "
                "(each key is queried at most once)"
            )
        if not 0 < self.power_a <= 1:
            raise ValueError(f"{owner}.power_a={self.power_a!r} must be in (0, 1] (1 = uniform query spacing)")
        for block, size in (("num_keys", self.vocab.num_keys), ("num_values", self.vocab.num_values)):
            if size < self.num_kv_pairs:
                raise ValueError(
                    f"{owner}.num_kv_pairs={self.num_kv_pairs} needs that many distinct keys and values, but the "
                    f"vocab has {block}={size} (raise vocab_size or the vocab's {block})"
                )
        if self.seq_len < self.min_seq_len:
            raise ValueError(
                f"{owner}.seq_len={self.seq_len} is too short: {self.num_kv_pairs} pairs and {self.num_queries} "
                f"queries of 2 tokens each need seq_len >= {self.min_seq_len}"
            )
        space = (self.seq_len - 2 * self.num_kv_pairs) // 2
        weights = self.power_a * np.arange(1, space + 1, dtype=np.float64) ** (self.power_a - 1)
        self._gap_p = weights / weights.sum()

    @property
    def min_seq_len(self) -> int:
        return 2 * self.num_kv_pairs + 2 * self.num_queries

    def _generate(self, rng: np.random.Generator):
        vocab, K, Q = self.vocab, self.num_kv_pairs, self.num_queries
        keys = vocab.key_start + rng.choice(vocab.num_keys, size=K, replace=False)
        values = vocab.value_start + rng.choice(vocab.num_values, size=K, replace=False)
        tokens = filler(rng, vocab, self.seq_len)
        tokens[0 : 2 * K : 2] = keys
        tokens[1 : 2 * K : 2] = values

        gaps = rng.choice(len(self._gap_p), size=Q, replace=False, p=self._gap_p)
        asked = rng.choice(K, size=Q, replace=False)
        positions = 2 * K + 2 * gaps
        tokens[positions] = keys[asked]
        tokens[positions + 1] = values[asked]
        depths = asked / (K - 1) if K > 1 else np.zeros(Q)
        return tokens, positions.astype(np.int64), values[asked], depths, 2 * asked + 1
