"""Train a byte-level BPE tokenizer on local text and save it as ``tokenizers`` JSON.

    python -m hydralm.data.train_tokenizer --input 'corpus/*.jsonl' --vocab-size 8192 \\
        --output data/tokenizer.json

then ``TextDataModule(tokenizer_path="data/tokenizer.json")``. Byte-level (GPT-2 alphabet as the
initial alphabet) means no text is ever out of vocabulary; ``<pad>, <bos>, <eos>`` get ids 0, 1, 2,
the same as the byte-level default, and are registered as special tokens (a literal "<eos>" in the
text encodes to the EOS id, as with most hub tokenizers).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hydralm.data.corpus import TXT_SAMPLE_BY, check_text_field, iter_texts, open_corpus
from hydralm.data.tokenizer import SPECIAL_TOKENS

MIN_VOCAB = len(SPECIAL_TOKENS) + 256


def train_tokenizer(
    data_files: str | Sequence[str],
    vocab_size: int,
    output: str = "data/tokenizer.json",
    text_field: str = "text",
    txt_sample_by: str = "line",
    min_frequency: int = 2,
) -> Tokenizer:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size!r} must be an int >= {MIN_VOCAB} ({len(SPECIAL_TOKENS)} specials + 256 bytes)"
        )
    # Streaming: documents are read once, never copied into a cache.
    corpus = open_corpus(data_files, streaming=True, txt_sample_by=txt_sample_by)
    check_text_field(corpus, text_field)
    texts = iter_texts(corpus, text_field)
    first = next(texts, None)
    if first is None:
        raise ValueError(f"data_files={data_files!r} yields no text in field {text_field!r}")

    def all_texts():
        yield first
        yield from texts

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(all_texts(), trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tokenizer.save(output)
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="txt/jsonl/json/parquet files, directories or globs")
    parser.add_argument("--vocab-size", type=int, required=True, help=f"target vocabulary size (>= {MIN_VOCAB})")
    parser.add_argument("--output", default="data/tokenizer.json", help="where to write the tokenizer JSON")
    parser.add_argument("--text-field", default="text", help="column holding the text (jsonl/parquet)")
    parser.add_argument("--txt-sample-by", default="line", choices=TXT_SAMPLE_BY, help="document unit in .txt")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    args = parser.parse_args(argv)
    try:
        tokenizer = train_tokenizer(
            args.input, args.vocab_size, args.output, args.text_field, args.txt_sample_by, args.min_frequency
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"wrote {args.output} (vocab_size={tokenizer.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
