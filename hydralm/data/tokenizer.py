"""Tokenizers for text data: a byte-level default that needs no file, or a trained ``tokenizer.json``.

The default maps byte ``b`` to id ``3 + b`` after ``<pad>=0, <bos>=1, <eos>=2`` (vocab 259). It is a
``tokenizers`` BPE with no merges over the GPT-2 byte alphabet, so it round-trips any UTF-8 text,
works offline, and shares the special-token convention of the BPE tokenizers ``train_tokenizer``
writes (same three specials first), so switching tokenizers never moves pad/bos/eos.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
# Fallback names so a third-party tokenizer.json (GPT-2, Llama, ...) also works.
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "[CLS]")
_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_level_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte, char in sorted(bytes_to_unicode().items()):
        vocab[char] = len(SPECIAL_TOKENS) + byte
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, every byte is one token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # The specials are deliberately not registered as "added tokens": a literal "<eos>" in a
    # document then stays 5 bytes, so byte b <-> id 3 + b holds for every input.
    return tokenizer


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer: Tokenizer
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    # The byte-level default's id of byte 0 (id = byte_offset + byte, for every input): encoding is then a
    # numpy view of the UTF-8 bytes (DocumentEncoder). None for a trained tokenizer.
    byte_offset: int | None = None


def _first_id(tokenizer: Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def load_tokenizer(tokenizer_path: str | None = None) -> TokenizerInfo:
    """``None`` -> byte-level default; else a ``tokenizers`` JSON file (e.g. from ``train_tokenizer``)."""
    if tokenizer_path is None:
        tokenizer = byte_level_tokenizer()
    else:
        path = os.path.expanduser(str(tokenizer_path))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"tokenizer_path={str(tokenizer_path)!r} does not exist; train one with "
                "`python -m hydralm.data.train_tokenizer --input ... --output data/tokenizer.json` "
                "or leave tokenizer_path unset for the byte-level default"
            )
        tokenizer = Tokenizer.from_file(path)
    bos_id, eos_id = _first_id(tokenizer, _BOS_NAMES), _first_id(tokenizer, _EOS_NAMES)
    pad_id = _first_id(tokenizer, _PAD_NAMES)
    # A pad id only fills positions whose label is -100 and that come after every real token of the
    # row, so any valid id is safe when the tokenizer has no pad token.
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    byte_offset = len(SPECIAL_TOKENS) if tokenizer_path is None else None
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    return TokenizerInfo(tokenizer, vocab_size, pad_id, bos_id, eos_id, byte_offset)
