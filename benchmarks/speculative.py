"""MTP self-draft speculative decoding vs plain decoding, on a trained checkpoint:

    python -m benchmarks.speculative --ckpt <last.ckpt or folder> --text <file> \\
        [--prompts 8] [--new 128] [--k 2] [--device cuda] [--decoder step|static|graph]

Prompts are byte-level-tokenised slices of the text file (the model must be trained on byte-level text with
mtp_depth >= k). For each prompt: greedy `generate` and greedy `speculative_generate(draft=None)`; prints
whether the tokens are identical, acceptance rate, tokens per round and the wall-clock speedup. The first
prompt is run once untimed (warm-up: CUDA context, kernel caches, compiles). --decoder is what both decode with
(`generate`'s and `speculative_generate`'s `decoder=`; "graph" = CUDA graphs for the step, the verify step, the
commit and the MTP draft steps).
"""

import argparse
import time

import torch

from hydralm import generate, load_model, speculative_generate
from hydralm.data import byte_level_tokenizer
from hydralm.generation import model_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decoder", default="step", choices=["step", "static", "graph"])
    args = parser.parse_args()
    model = load_model(args.ckpt).to(args.device).eval()
    sync = torch.cuda.synchronize if model_device(model).type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        started = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - started

    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode(open(args.text, encoding="utf-8").read()).ids
    step = max(1, (len(ids) - args.prompt_len) // args.prompts)
    totals = {"plain": 0.0, "spec": 0.0, "same": 0, "accepted": 0, "proposed": 0, "rounds": 0, "tokens": 0}
    prompts = [
        torch.tensor(ids[i * step : i * step + args.prompt_len], device=args.device)[None] for i in range(args.prompts)
    ]
    decoder = args.decoder  # the same kind of decoder on both sides
    generate(model, prompts[0], args.new, temperature=0, decoder=decoder)  # warm-up
    speculative_generate(model, None, prompts[0], args.new, k=args.k, temperature=0, decoder=decoder)
    for prompt in prompts:
        plain, seconds = timed(lambda: generate(model, prompt, args.new, temperature=0, decoder=decoder))
        totals["plain"] += seconds
        (spec, stats), seconds = timed(
            lambda: speculative_generate(model, None, prompt, args.new, k=args.k, temperature=0, decoder=decoder)
        )
        totals["spec"] += seconds
        totals["same"] += int(torch.equal(plain, spec))
        for key in ("accepted", "proposed", "rounds"):
            totals[key] += getattr(stats, key)
        totals["tokens"] += stats.new_tokens
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"model: {model.cfg.summary()}; torch {torch.__version__}, {where}, decoder={decoder}")
    print(
        "| prompts | new tokens | identical to greedy generate | acceptance | tokens/round | generate s "
        "| self-draft s | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.prompts} | {args.new} | {totals['same']}/{args.prompts} "
        f"| {totals['accepted'] / max(1, totals['proposed']):.3f} | "
        f"{totals['tokens'] / max(1, totals['rounds']):.2f} | {totals['plain']:.2f} | {totals['spec']:.2f} | "
        f"{totals['plain'] / totals['spec']:.2f}x |"
    )


if __name__ == "__main__":
    main()
