"""Speed of the Triton retrieval-attention kernel against the flex paths: `python -m benchmarks.retrieval_kernel`.

bf16 forward + backward of the attention alone (no projections), at the 160m preset's widths (H 12, D 64) with
C 64 and top_k 8, at 16k x 4 and 64k x 1 tokens (BENCH_RETRIEVAL_SHAPES=4x16384,1x65536 picks them), with
random, coherent (`coherent_queries`: a 128-token tile's queries ask about one thing, so they route alike) and
hot queries (every token of a head picks the same first chunks, as with a sink: the longest per-chunk lists);
BENCH_RETRIEVAL_QUERIES=random,coherent,hot picks them.
Columns (ms, median of triton.testing.do_bench):
  swa_flex            sliding-window attention through flex_attention, window 512 (the layer it is measured against)
  retrieval_flex      retrieval through flex_attention with the routed block mask (kernels/retrieval/flex.py)
  retrieval_triton    kernels/retrieval/triton_sparse.py, routing included
  triton_fwd          its forward alone
  triton_given_routing  its fwd+bwd given the routing (the attention without the router)
  triton_routing      its routing and per-chunk lists alone (route_sequence + selection_csr)
plus triton / swa, triton / flex, the Triton path's peak memory, and rel_diff_vs_flex (|triton - flex| / |flex|,
a sanity check: bf16, and a near-tie may route one token differently in the two paths).
torch's fp32 matmul precision is "high" as in training (conf/train.yaml), so the router scores in TF32;
BENCH_RETRIEVAL_PRECISION=highest measures it with tf32x3 scores (kernels/retrieval/triton_routing.py; record keys
kernel_ms/retrieval-triton-<queries>-highest/<T>).
BENCH_RETRIEVAL_PROFILE=1 also prints, per row, the Triton path's fwd+bwd by kernel (torch.profiler, 3 calls).
Results also go to $OUT/retrieval_kernel.json when OUT is set, and to the benchmark record:
`kernel_ms/retrieval-triton-<queries>/<T>` (fwd+bwd, routing included) against `kernel_ms/swa-flex/<T>`.
"""

import json
import os

import torch
from triton.testing import do_bench

from benchmarks import record
from benchmarks.speed import _print_table, coherent_queries
from hydralm.kernels.attention.flex import sliding_window_flex
from hydralm.kernels.retrieval.flex import retrieval_flex
from hydralm.kernels.retrieval.routing import route_sequence
from hydralm.kernels.retrieval.selection_csr import selection_csr, tile_work_list
from hydralm.kernels.retrieval.triton_sparse import retrieval_attention_triton

H, D, C, TOP_K, WINDOW = 12, 64, 64, 8, 512


def bench(fn, rep: int = 100) -> float:
    fn()  # compile and autotune outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def fwd_bwd(attention, q, k, v):
    def step():
        attention(q, k, v).sum().backward()

    return step


def row(B: int, T: int, queries: str) -> dict:
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if queries == "coherent":
        q = coherent_queries(q.float()).bfloat16()
    if queries == "hot":  # every token of a head picks the first TOP_K chunks: lists of T slots each
        shared = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        q = shared + 0.1 * q
        k[:, :, : TOP_K * C] += 3 * shared
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def triton_path(a, b, c):
        return retrieval_attention_triton(a, b, c, C, TOP_K)

    def routing():
        selected = route_sequence(q, k, C, TOP_K)
        entries, offsets = selection_csr(selected, k.shape[1], T // C)
        return tile_work_list(offsets, entries.numel(), 64)

    result = {"shape": f"B{B} T{T} H{H} D{D} C{C} k{TOP_K}", "queries": queries}
    result["swa_flex"] = bench(fwd_bwd(lambda a, b, c: sliding_window_flex(a, b, c, WINDOW), q, k, v))
    result["retrieval_flex"] = bench(fwd_bwd(lambda a, b, c: retrieval_flex(a, b, c, C, TOP_K), q, k, v), 20)
    torch.cuda.reset_peak_memory_stats()
    result["retrieval_triton"] = bench(fwd_bwd(triton_path, q, k, v))
    result["triton_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    selected = route_sequence(q, k, C, TOP_K)
    result["triton_given_routing"] = bench(
        fwd_bwd(lambda a, b, c: retrieval_attention_triton(a, b, c, C, TOP_K, selected=selected), q, k, v)
    )
    if os.environ.get("BENCH_RETRIEVAL_PROFILE") == "1":
        _print_kernels(fwd_bwd(triton_path, q, k, v))
    with torch.no_grad():
        result["triton_fwd"] = bench(lambda: triton_path(q, k, v))
        result["triton_routing"] = bench(routing)
        flex_out, triton_out = retrieval_flex(q, k, v, C, TOP_K).float(), triton_path(q, k, v).float()
    result["triton/swa"] = result["retrieval_triton"] / result["swa_flex"]
    result["triton/flex"] = result["retrieval_triton"] / result["retrieval_flex"]
    result["rel_diff_vs_flex"] = float((triton_out - flex_out).norm() / flex_out.norm())
    print(result, flush=True)
    size = T if B * T == 65536 else f"{T}x{B}"  # the record's sizes: tokens per sequence at 64k tokens per step
    precision = torch.get_float32_matmul_precision()
    variant = "" if precision == "high" else f"-{precision}"  # training's precision has the plain key
    record.record(f"kernel_ms/retrieval-triton-{queries}{variant}/{size}", result["retrieval_triton"], "ms",
                  peer=f"kernel_ms/swa-flex/{size}")  # fmt: skip
    record.record(f"kernel_ms/swa-flex/{size}", result["swa_flex"], "ms")
    record.write()  # after each row: a cut-off run keeps what it measured
    return result


def _print_kernels(step, calls: int = 3) -> None:
    """The GPU time of `calls` runs of step by kernel, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)


def main() -> None:
    torch.manual_seed(0)
    # the router's fp32 scores: TF32 as in training (conf/train.yaml), or tf32x3 under "highest"
    torch.set_float32_matmul_precision(os.environ.get("BENCH_RETRIEVAL_PRECISION", "high"))
    print({"device": torch.cuda.get_device_name(), "torch": torch.__version__}, flush=True)
    shapes = os.environ.get("BENCH_RETRIEVAL_SHAPES", "4x16384,1x65536").split(",")
    modes = os.environ.get("BENCH_RETRIEVAL_QUERIES", "random,coherent,hot").split(",")
    rows = [row(int(b), int(t), mode) for b, t in (s.split("x") for s in shapes) for mode in modes]
    columns = ["shape", "queries", "swa_flex", "retrieval_flex", "retrieval_triton", "triton_fwd"]
    columns += ["triton_given_routing", "triton_routing"]
    columns += ["triton/swa", "triton/flex", "triton_peak_GiB", "rel_diff_vs_flex"]
    _print_table("retrieval attention, bf16 fwd+bwd (ms)", rows, columns)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "retrieval_kernel.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
