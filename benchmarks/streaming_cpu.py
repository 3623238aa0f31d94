"""Streaming and decode on CPU: state bytes and batch-1 decode speed at 4k, 64k and 1M tokens of context.

    python -m benchmarks.streaming_cpu [--tokens 1048576] [--chunk 8192]

A small HydraLM with compressive memory on (the C4/C5 model of the claim suite) reads a random-token
stream chunk by chunk through StreamingEngine; at each checkpoint length it reports the state's allocated
bytes and the median per-token time of `model.step` (greedy, batch 1), measured at the end by stepping every
mark's state in turn so that machine load affects all lengths alike. Random weights: speed and memory
do not depend on training. Prints a table; `--json` writes the numbers.
"""

import argparse
import json
import time

import torch

from hydralm import HydraConfig, HydraLM, StreamingEngine, clone_state, state_bytes
from hydralm.eval.claims import STREAM_MODEL, decode_latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = HydraConfig(**STREAM_MODEL)
    model = HydraLM(cfg).eval()
    engine = StreamingEngine(model, chunk_size=args.chunk)
    marks = [m for m in (4096, 65536, args.tokens) if m <= args.tokens]
    rows, states, done, started = [], [], 0, time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    for mark in marks:
        while done < mark:
            piece = min(mark - done, 1 << 16)
            engine.process(torch.randint(0, cfg.vocab_size, (1, piece), generator=gen))
            done += piece
        rows.append(
            {"context": mark, "state_bytes": state_bytes(engine.state), "stream_seconds": time.perf_counter() - started}
        )
        states.append(clone_state(engine.state))
        print(rows[-1], flush=True)
    # decode speed from every mark's state, stepped in turn, so machine load hits all lengths alike
    for row, seconds in zip(rows, decode_latencies(model, states, steps=64)):
        row.update(decode_ms=1e3 * seconds, decode_tok_s=1 / seconds)
    print(
        f"\nmodel: {cfg.summary()}, {model.num_parameters() / 1e6:.2f}M params, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| context | state bytes | decode ms/token | decode tok/s | stream time so far (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['context']:,} | {r['state_bytes']:,} | {r['decode_ms']:.2f} | {r['decode_tok_s']:.0f} | "
            f"{r['stream_seconds']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
