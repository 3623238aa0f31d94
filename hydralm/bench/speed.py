"""GPU speed benchmarks; each prints a table. Run next to the peers (../shared/tools/peer_bench.py) in the
same call so ratios compare like with like:

    python -m hydralm.bench.speed [layers] [models] [decode]

layers  bf16 fwd+bwd: our GDN kernel (PyTorch chunkwise) at B8 T4096 H16 K128; SWA (flex) and retrieval
        (flex, token-routed, C=128, k=8) at 4k/16k/64k with 64k tokens per batch, H16 D128.
models  training step of HydraLM-160m (20-layer schedule) and of the DenseTransformer with the same fields,
        bf16 autocast, fused AdamW, 64k tokens per step, at 4k/16k/64k context.
decode  batch-1 decode latency of HydraLM-160m (compressive memory on) after 4k and 64k tokens of context.
Results also go to $OUT/speed.json when OUT is set.
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

RESULTS: dict = {}


def bench(fn, rep: int = 50) -> float:
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def _print_table(title: str, rows: list, cols: list) -> None:
    print(f"\n## {title}\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    for row in rows:
        print("| " + " | ".join(f"{row.get(c, ''):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols) + " |",
              flush=True)


def layers() -> None:
    from hydralm.kernels.delta_rule import delta_rule_chunkwise
    from hydralm.kernels.flex import retrieval_flex, sliding_window_flex

    rows = []
    B, T, H, K = 8, 4096, 16, 128
    q = F.normalize(torch.randn(B, H, T, K, device="cuda"), dim=-1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(B, H, T, K, device="cuda"), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(B, H, T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = F.logsigmoid(torch.randn(B, H, T, device="cuda") + 4).requires_grad_()
    beta = torch.rand(B, H, T, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def gdn():
        o, _ = delta_rule_chunkwise(q, k, v, g, beta, chunk_size=64)
        o.float().sum().backward()

    rows.append({"layer": "GDN torch chunkwise (eager)", "shape": f"B{B} T{T} H{H} K{K}", "ms": bench(gdn, 20)})
    print(rows[-1], flush=True)
    if os.environ.get("BENCH_COMPILE"):  # torch.compile of the chunk loop: ~70 s+ of compile per shape
        compiled = torch.compile(delta_rule_chunkwise)

        def gdn_compiled():
            o, _ = compiled(q, k, v, g, beta, chunk_size=64)
            o.float().sum().backward()

        rows.append({"layer": "GDN torch chunkwise (compiled)", "shape": f"B{B} T{T} H{H} K{K}", "ms": bench(gdn_compiled, 20)})
        print(rows[-1], flush=True)
    del q, k, v, g, beta
    Hh, D, C, TOPK, W = 16, 128, 128, 8, 512
    for T in (4096, 16384, 65536):
        B = max(1, 65536 // T)
        q, k, v = (torch.randn(B, Hh, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        coherent_q = (q.detach().unflatten(2, (T // 128, 128)).mean(3, keepdim=True) + 0.1 * q.detach().unflatten(2, (T // 128, 128)))
        coherent_q = coherent_q.flatten(2, 3).requires_grad_()

        def swa():
            sliding_window_flex(q, k, v, W).sum().backward()

        def ret(query):
            return lambda: retrieval_flex(query, k, v, C, TOPK).sum().backward()

        row = {"layer": "attention", "shape": f"B{B} T{T} H{Hh} D{D}", "swa_flex_ms": bench(swa),
               "retrieval_random_q_ms": bench(ret(q), 20), "retrieval_coherent_q_ms": bench(ret(coherent_q), 20)}
        row["retrieval/swa (coherent)"] = row["retrieval_coherent_q_ms"] / row["swa_flex_ms"]
        rows.append(row)
        print(row, flush=True)
        del q, k, v, coherent_q
    RESULTS["layers"] = rows
    _print_table("layers, bf16 fwd+bwd (ms)", rows, ["layer", "shape", "ms", "swa_flex_ms", "retrieval_random_q_ms",
                                                  "retrieval_coherent_q_ms", "retrieval/swa (coherent)"])


def models() -> None:
    from hydralm import DenseTransformer, HydraConfig, HydraLM

    cfg = HydraConfig.from_preset("160m")
    rows = []
    for name, cls in (("HydraLM-160m", HydraLM), ("Dense-160m", DenseTransformer)):
        model = cls(cfg).cuda()
        params = model.num_parameters()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        for T in [int(t) for t in os.environ.get("BENCH_CONTEXTS", "4096,16384,65536").split(",")]:
            B = max(1, 65536 // T)
            ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(ids)["logits"]
                    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                ms = bench(step, 10)
                rows.append({"model": name, "params_M": params / 1e6, "T": T, "B": B, "ms": ms, "ktok_s": B * T / ms})
            except torch.OutOfMemoryError:
                rows.append({"model": name, "params_M": params / 1e6, "T": T, "B": B, "ms": "OOM"})
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)
        del model, opt
        torch.cuda.empty_cache()
    RESULTS["models"] = rows
    _print_table("training step, bf16 autocast, 64k tokens/step", rows, ["model", "params_M", "T", "B", "ms", "ktok_s"])


@torch.no_grad()
def decode() -> None:
    from hydralm import HydraConfig, HydraLM, StreamingEngine

    cfg = HydraConfig.from_preset("160m", memory={"exact_window": 4096, "compress_every": 8, "pool_size": 4096})
    model = HydraLM(cfg).cuda().bfloat16().eval()
    rows = []
    engine = StreamingEngine(model, chunk_size=8192)
    done = 0
    for context in (4096, 65536):
        engine.process(torch.randint(0, cfg.vocab_size, (1, context - done), device="cuda"))
        done = context
        state, token = engine.state, torch.zeros(1, dtype=torch.long, device="cuda")
        for _ in range(5):
            logits, state = model.step(token, state)
        torch.cuda.synchronize()
        started, n = time.perf_counter(), 50
        for _ in range(n):
            logits, state = model.step(token, state)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - started) / n * 1e3
        rows.append({"context": context, "ms_per_token": ms, "tok_s": 1e3 / ms})
    RESULTS["decode"] = rows
    _print_table("batch-1 decode, HydraLM-160m bf16, memory on", rows, ["context", "ms_per_token", "tok_s"])


def main(argv: list) -> int:
    sections = argv or ["layers", "models", "decode"]
    print({"device": torch.cuda.get_device_name(), "torch": torch.__version__}, flush=True)
    for name in sections:
        try:
            {"layers": layers, "models": models, "decode": decode}[name]()
        except Exception as err:  # a failed section is reported, the others still run
            import traceback

            traceback.print_exc()
            RESULTS[f"{name}_error"] = repr(err)[:300]
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "speed.json"), "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
