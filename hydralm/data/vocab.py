"""Token layout shared by the synthetic tasks (retrieval_qa, mqar, needle).

Ids are laid out in contiguous blocks so a token's role is readable from its id alone::

    [0, NUM_SPECIAL)                       special tokens (PAD=0, BOS, EOS, FACT, QUERY, reserved)
    [key_start,    key_start + num_keys)   key tokens     (keys of facts / kv pairs)
    [value_start,  value_start + num_values) value tokens (the answers)
    [filler_start, vocab_size)             filler tokens  (haystack / noise)

Keys, values and filler never share ids, so a query is never ambiguous with haystack noise and
an answer can only be produced by recalling the fact (the model cannot guess it from the
token class of its neighbours).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
FACT_ID = 3
QUERY_ID = 4
# Ids 5..7 are kept free so a task can add a marker later without shifting every other id
# (which would silently invalidate trained checkpoints).
NUM_SPECIAL = 8


@dataclass(frozen=True)
class SyntheticVocab:
    """Split ``vocab_size`` ids into specials, keys, values and filler.

    ``num_keys`` / ``num_values`` default to a quarter each of the non-special ids; filler gets
    the rest (at least one id). Raises ``ValueError`` naming the field when the layout does not fit.
    """

    vocab_size: int = 512
    num_keys: int | None = None
    num_values: int | None = None
    # Filled in by __post_init__ (frozen dataclass, hence object.__setattr__).
    num_filler: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or self.vocab_size < NUM_SPECIAL + 3:
            raise ValueError(
                f"SyntheticVocab.vocab_size={self.vocab_size!r} is too small: need at least "
                f"{NUM_SPECIAL + 3} ({NUM_SPECIAL} special ids + 1 key + 1 value + 1 filler id)"
            )
        free = self.vocab_size - NUM_SPECIAL
        num_keys = free // 4 if self.num_keys is None else self.num_keys
        num_values = free // 4 if self.num_values is None else self.num_values
        for name, value in (("num_keys", num_keys), ("num_values", num_values)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SyntheticVocab.{name}={value!r} must be an int >= 1")
        num_filler = free - num_keys - num_values
        if num_filler < 1:
            raise ValueError(
                f"SyntheticVocab.vocab_size={self.vocab_size} is too small for num_keys={num_keys} "
                f"and num_values={num_values}: need vocab_size >= {NUM_SPECIAL + num_keys + num_values + 1} "
                f"({NUM_SPECIAL} special + keys + values + at least 1 filler id)"
            )
        object.__setattr__(self, "num_keys", num_keys)
        object.__setattr__(self, "num_values", num_values)
        object.__setattr__(self, "num_filler", num_filler)

    @property
    def key_start(self) -> int:
        return NUM_SPECIAL

    @property
    def value_start(self) -> int:
        return NUM_SPECIAL + self.num_keys

    @property
    def filler_start(self) -> int:
        return NUM_SPECIAL + self.num_keys + self.num_values

    def role(self, token_id: int) -> str:
        """Name of the block ``token_id`` falls in (for debugging and tests)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside [0, {self.vocab_size})")
        if token_id < NUM_SPECIAL:
            return "special"
        if token_id < self.value_start:
            return "key"
        if token_id < self.filler_start:
            return "value"
        return "filler"


def as_vocab(vocab: SyntheticVocab | int | Mapping) -> SyntheticVocab:
    """Let task configs say ``vocab: 512`` (default layout), ``vocab: {vocab_size: .., num_keys: ..}``
    (a Hydra mapping) or pass a full ``SyntheticVocab``."""
    if isinstance(vocab, SyntheticVocab):
        return vocab
    if isinstance(vocab, Mapping):
        return SyntheticVocab(**dict(vocab))
    if isinstance(vocab, bool) or not isinstance(vocab, int):
        raise ValueError(f"vocab={vocab!r} must be an int vocab_size, a mapping or a SyntheticVocab")
    return SyntheticVocab(vocab_size=vocab)
