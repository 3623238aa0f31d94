"""Profile decoding: `python -m benchmarks.profile_decode [preset] [context] [d_model] [compile]`.

Eager decoding is bound by host time per PyTorch call, so this counts calls; the CUDA-graph step is bound by
its kernels' GPU time (docs/inference.md), so on a GPU it lists them. After `context` random tokens (compressive
memory on, as `speed decode` runs it) it prints
  * ms per `model.step` (median of 5 windows of 20 steps), and per `StaticDecoder.step` (fixed shapes;
    with `compile`, also torch.compile'd: a CUDA graph on a GPU); on a GPU (bf16) also the kernels of its
    steps: how many per token, their GPU time against the wall time, the costliest,
  * aten calls per token, and per layer call of each mixer / MLP / RMSNorm,
  * a stateful forward over 1, 2 and 3 tokens against one step: what a speculative-decoding verification
    round costs in steps.
`BENCH_DECODE_BATCH` (default 1) rows decode together; `BENCH_KERNEL_ROWS` (default 30) kernels are listed;
`BENCH_COMPILE_MODE` (default reduce-overhead; max-autotune also graph-captures) is the compiled step's mode on
a GPU.
`d_model` narrows the preset (same layer schedule) so that the matmuls do not hide the host time on a CPU.

`python -m benchmarks.profile_decode [preset] [context] [d_model] kernels` only compiles the StaticDecoder step
(torch.compile, inductor) and prints how many kernels inductor generated for it: C++ kernels on a CPU, Triton
kernels on a GPU. The count moves with the decode switches (HYDRALM_DECODE_LINEAR, HYDRALM_RETRIEVAL_DECODE) and
needs no timing, so a CPU shows what a switch removes (with TRITON_INTERPRET=1 for the Triton paths).
"""

import collections
import os
import statistics
import sys
import time
from typing import Dict

import torch

from benchmarks.profile_stream import in_profiler_range
from benchmarks.speed import DECODE_MEMORY, timed_windows
from hydralm import HydraConfig, HydraLM, StreamingEngine
from hydralm.static_decode import StaticDecoder


def main(preset: str = "160m", context: int = 8192, d_model: int = 96, compile_static: bool = False) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = _decode_model(preset, d_model, device)
    cfg = model.cfg
    engine = StreamingEngine(model, chunk_size=min(context, 4096))
    batch = int(os.environ.get("BENCH_DECODE_BATCH", "1"))  # rows decoded together
    token = torch.zeros(batch, dtype=torch.long, device=device)

    def ms_per_call(fn, calls: int = 20) -> float:
        return statistics.median(timed_windows(fn, calls, sync=sync))

    with torch.no_grad():
        engine.process(torch.randint(0, cfg.vocab_size, (batch, context), device=device))
        state = engine.state
        for _ in range(20):  # warm-up
            model.step(token, state)
        step_ms = ms_per_call(lambda: model.step(token, state))
        print(f"{cfg.summary()} on {device}, after {context} tokens: {step_ms:.2f} ms per step", flush=True)
        for compiled in (False, True) if compile_static else (False,):
            decoder = StaticDecoder(
                model,
                state,
                compile=compiled,
                # max-autotune also graph-captures and tunes Triton templates against cuBLAS for the one-row matmuls
                compile_mode=os.environ.get("BENCH_COMPILE_MODE", "reduce-overhead")
                if compiled and device == "cuda"
                else None,
            )
            started = time.perf_counter()
            for _ in range(20):  # warm-up (and compilation)
                decoder.step(token)
            warm_s = time.perf_counter() - started
            ms = ms_per_call(lambda: decoder.step(token))
            if device == "cuda":
                _print_kernels(lambda: decoder.step(token), f"StaticDecoder{' compiled' if compiled else ''}")
            print(
                f"StaticDecoder{' compiled' if compiled else ''}: {ms:.2f} ms per step = {step_ms / ms:.2f}x faster "
                f"(warm-up {warm_s:.0f} s)",
                flush=True,
            )
        for n in (1, 2, 3):
            ids = torch.zeros(batch, n, dtype=torch.long, device=device)
            ms = ms_per_call(lambda: model(ids, state=state, return_state=True, return_hidden=True), 5)
            print(f"stateful forward over {n} token(s): {ms:.2f} ms = {ms / step_ms:.2f} steps", flush=True)
        ranges = _label_layers(model)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(8):
                model.step(token, state)
    events = prof.events()
    total = sum(1 for e in events if e.name.startswith("aten::"))
    print(f"aten calls per token: {total / 8:.0f} (views included)")
    calls, aten = collections.Counter(), collections.Counter()
    for event in events:
        if event.name in ranges:
            calls[event.name] += 1
            aten[event.name] += _aten_below(event)
    print("| part | calls per token | aten calls per call |\n|---|---|---|")
    for name in sorted(calls, key=lambda n: -aten[n] / calls[n]):
        print(f"| {name} | {calls[name] / 8:.0f} | {aten[name] / calls[name]:.0f} |", flush=True)


def _print_kernels(step, label: str, steps: int = 10) -> None:
    """The GPU kernels of `steps` decode steps (inside a CUDA graph too): count per step, GPU time per step
    against the wall time, and the kernels that take the most time."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels) / steps
    print(f"{label}: {len(kernels) / steps:.0f} GPU kernels per step, {busy_us / 1000:.3f} ms of GPU time per step")
    by_name: Dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time
    print("| kernel | per step | us per step |\n|---|---|---|")
    rows = int(os.environ.get("BENCH_KERNEL_ROWS", "30"))  # the costliest kernels listed (names cut at 160)
    for name, (count, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"| {name[:160]} | {count / steps:.0f} | {us / steps:.1f} |", flush=True)


def _label_layers(model) -> set:
    """Wrap each mixer's step and each block's MLP / norms in a profiler range named by what it is."""
    names = set()
    for block in model.blocks:
        for name, module, method in (
            (f"{block.layer_type} mixer step", block.mixer, "step"),
            ("mlp", block.mlp, "step"),
            ("rmsnorm", block.mixer_norm, "forward"),
            ("rmsnorm", block.mlp_norm, "forward"),
        ):
            setattr(module, method, in_profiler_range(name, getattr(module, method)))
            names.add(name)
    return names


def _aten_below(event) -> int:
    stack, count = list(event.cpu_children), 0
    while stack:
        child = stack.pop()
        count += child.name.startswith("aten::")
        stack.extend(child.cpu_children)
    return count


def _decode_model(preset: str, d_model: int, device: str) -> HydraLM:
    """The preset with compressive memory (as `speed decode` runs it), narrowed to d_model when > 0; bf16 on a GPU,
    as `speed decode_batched` decodes."""
    overrides = {} if d_model <= 0 else {"d_model": d_model}
    model = HydraLM(HydraConfig.from_preset(preset, memory=DECODE_MEMORY, **overrides)).to(device).eval()
    return model.bfloat16() if device == "cuda" else model


def count_compiled_kernels(preset: str = "160m", context: int = 2048, d_model: int = 96) -> int:
    """Kernels inductor generates for one compiled StaticDecoder step after `context` random tokens (memory on)."""
    from torch._inductor import metrics

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _decode_model(preset, d_model, device)
    engine = StreamingEngine(model, chunk_size=min(context, 4096))
    with torch.no_grad():
        engine.process(torch.randint(0, model.cfg.vocab_size, (1, context), device=device))
        decoder = StaticDecoder(model, engine.state, compile=True)
        metrics.reset()
        decoder.step(torch.zeros(1, dtype=torch.long, device=device))  # compiles
    count = metrics.generated_kernel_count
    print(f"{model.cfg.summary()} on {device}: {count} kernels generated for the compiled decode step", flush=True)
    return count


if __name__ == "__main__":
    preset, numbers = (sys.argv[1] if len(sys.argv) > 1 else "160m"), [int(a) for a in sys.argv[2:4]]
    if "kernels" in sys.argv[4:]:
        count_compiled_kernels(preset, *numbers)
    else:
        main(preset, *numbers, "compile" in sys.argv[4:])
