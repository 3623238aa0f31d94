"""Profile one training step of a preset on CUDA: `python -m benchmarks.profile_step [preset] [T] [B]`.
Prints the top operators by CUDA time, the kernels by their own CUDA time, and the top operators by CPU time
(torch.profiler), after three warm-up steps; then 2-layer models of each layer type, fwd+bwd."""

import sys
import time

import torch

from benchmarks.speed import training_step
from hydralm import HydraConfig, HydraLM


def main(preset: str = "160m", T: int = 4096, B: int = 16) -> None:
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as in training
    cfg = HydraConfig.from_preset(preset)
    model = HydraLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

    step = training_step(model, ids, opt)

    for i in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        print(f"step {i}: {time.perf_counter() - start:.3f}s", flush=True)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)
    # the kernels themselves (self time), where the step's GPU time actually goes
    print(table.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90), flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)
    for layer_type in ("deltanet", "swa", "retrieval"):
        sub = HydraLM(cfg.replace(n_layers=2, layer_types=[layer_type] * 2)).cuda()
        x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = sub(x, labels=x, return_logits=False)["loss"]
            loss.backward()
            torch.cuda.synchronize()
        print(f"2 x {layer_type} layers fwd+bwd: {time.perf_counter() - start:.3f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "160m", *(int(a) for a in sys.argv[2:4]))
