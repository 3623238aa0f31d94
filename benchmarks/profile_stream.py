"""Profile the streaming prefill: `python -m benchmarks.profile_stream [preset] [context] [chunk]`.

HydraLM (random weights, compressive memory on, as `speed decode` runs it) reads `context` random tokens
through StreamingEngine in `chunk`-token calls; the last call is profiled (torch.profiler, CUDA and CPU
time on a GPU, CPU time otherwise) and each layer type's share of it is printed. On an H200 this prefill
ran at 23-27k tokens/s (2026-11-28, 9c408d6; CHANGELOG.md), far below a training forward and the 200k
target (docs/benchmarks.md); this finds out where it goes.
"""

import sys
import time

import torch

from benchmarks.speed import DECODE_MEMORY
from hydralm import HydraConfig, HydraLM, StreamingEngine


def main(preset: str = "160m", context: int = 65536, chunk: int = 8192) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = HydraConfig.from_preset(preset, memory=DECODE_MEMORY)
    model = HydraLM(cfg).to(device).eval()
    if device == "cuda":
        model = model.bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (1, context), device=device)
    engine = StreamingEngine(model, chunk_size=chunk)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        for start in range(0, context - chunk, chunk):
            sync()
            began = time.perf_counter()
            engine.process(ids[:, start : start + chunk])
            sync()
            print(f"tokens {start + chunk}: {chunk / (time.perf_counter() - began):.0f} tok/s", flush=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        for i, block in enumerate(model.blocks):  # one profiler range per layer, named by its type
            block.forward = in_profiler_range(f"layer{i:02d}.{block.layer_type}", block.forward)
        with torch.profiler.profile(activities=activities) as prof:
            engine.process(ids[:, context - chunk :])
            sync()
    table = prof.key_averages()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(table.table(sort_by=sort, row_limit=30, max_name_column_width=70), flush=True)
    by_type = {}
    for event in table:
        if event.key.startswith("layer") and "." in event.key:  # the ranges named above, not aten ops
            kind = event.key.split(".", 1)[1]
            cpu, gpu = by_type.get(kind, (0.0, 0.0))
            by_type[kind] = (cpu + event.cpu_time_total, gpu + getattr(event, "device_time_total", 0.0))
    print("| layer type | CPU ms (incl. launches) | GPU ms |\n|---|---|---|")
    for kind, (cpu, gpu) in sorted(by_type.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {cpu / 1e3:.1f} | {gpu / 1e3:.1f} |", flush=True)


def in_profiler_range(name, forward):
    """`forward` wrapped in a torch.profiler range called `name` (profile_decode uses it too)."""

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(name):
            return forward(*args, **kwargs)

    return wrapped


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "160m", *(int(a) for a in sys.argv[2:4]))
