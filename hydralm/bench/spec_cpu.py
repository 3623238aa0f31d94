"""MTP self-draft speculative decoding vs plain decoding, on a trained checkpoint:

    python -m hydralm.bench.spec_cpu --ckpt <last.ckpt or folder> --text <file> [--prompts 8] [--new 128] [--k 2]

Prompts are byte-level-tokenised slices of the text file (the model must be trained on byte-level text with
mtp_depth >= k). For each prompt: greedy `generate` and greedy `speculative_generate(draft=None)`; prints
whether the tokens are identical, acceptance rate, tokens per round and the wall-clock speedup.
"""

import argparse
import time

import torch

from hydralm import generate, load_model, speculative_generate
from hydralm.data import byte_level_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--k", type=int, default=2)
    args = parser.parse_args()
    model = load_model(args.ckpt).eval()
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode(open(args.text, encoding="utf-8").read()).ids
    step = max(1, (len(ids) - args.prompt_len) // args.prompts)
    totals = {"plain": 0.0, "spec": 0.0, "same": 0, "accepted": 0, "proposed": 0, "rounds": 0, "tokens": 0}
    for i in range(args.prompts):
        prompt = torch.tensor(ids[i * step: i * step + args.prompt_len])[None]
        started = time.perf_counter()
        plain = generate(model, prompt, args.new, temperature=0)
        totals["plain"] += time.perf_counter() - started
        started = time.perf_counter()
        spec, stats = speculative_generate(model, None, prompt, args.new, k=args.k, temperature=0)
        totals["spec"] += time.perf_counter() - started
        totals["same"] += int(torch.equal(plain, spec))
        for key in ("accepted", "proposed", "rounds"):
            totals[key] += getattr(stats, key)
        totals["tokens"] += stats.new_tokens
    print(f"model: {model.cfg.summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| prompts | new tokens | identical to greedy generate | acceptance | tokens/round | generate s | self-draft s | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.prompts} | {args.new} | {totals['same']}/{args.prompts} | {totals['accepted'] / max(1, totals['proposed']):.3f} | "
          f"{totals['tokens'] / max(1, totals['rounds']):.2f} | {totals['plain']:.2f} | {totals['spec']:.2f} | "
          f"{totals['plain'] / totals['spec']:.2f}x |")


if __name__ == "__main__":
    main()
