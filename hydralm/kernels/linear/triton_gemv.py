"""y = x W^T for a few rows (decoding) as one Triton kernel (backend HYDRALM_DECODE_LINEAR=gemv).

At batch 1 a decode step's matmuls read each weight once and do almost no arithmetic: they are bound by memory
bandwidth. cuBLAS runs them with tensor-core tiles made for many rows, which on an H200 read the 160m model's
weights at about 1.3 TB/s (docs/inference.md). Here each program owns a few output columns (BLOCK_N rows of W),
streams them over K once and multiplies every input row (at most MAX_ROWS) with them on the CUDA cores, fp32
accumulation; columns are split finely enough that every SM has programs in flight. No split over K: each
output is one program's sum, so results are deterministic for a given configuration. On a GPU, one-row calls
autotune the columns per program and the K step per (N, K) among candidates that include the fixed heuristic's
choice (`_blocks`, what every other call and the interpreter use): on an H200 (50899ff, autotuning every call)
batch-1 graph decoding of the 160m model went from 923 to 1009 tokens/s, while MTP self-drafting, whose verify
calls have 3 rows, measured 1.57x where the heuristic had given 1.69x; the several-row calls keep the heuristic
until they are measured apart. Configurations sum in different orders, so two processes that pick differently
may differ in the last bits, as cuBLAS's heuristics may.
"""

import torch

from hydralm.kernels.triton_common import interpreting, tl, triton

MAX_ROWS = 16  # rows (tokens x batch) a call may have: a decode step, a speculative verify of a few tokens
MIN_PROGRAMS = 128  # programs a call should have at least: about one per SM on an H200 (132 SMs)
TILE = 8192  # elements of one step's (rows x columns x K) product per program (the heuristic's tile)
MAX_TILE = 16384  # the largest (rows x columns x K) tile the autotuner may try (registers)


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x, w, y, M, N, K, stride_xm, stride_wn, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w_tile = tl.load(
                w + cols[:, None] * stride_wn + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0
            ).to(tl.float32)  # (BLOCK_N, BLOCK_K)
            x_tile = tl.load(
                x + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0
            ).to(tl.float32)  # (BLOCK_M, BLOCK_K)
            acc += tl.sum(x_tile[:, None, :] * w_tile[None, :, :], axis=2)
        out = y + rows[:, None] * stride_ym + cols[None, :]
        tl.store(out, acc.to(y.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))

    def _keep_configs(configs, named_args, **kwargs):
        """The candidates for this call: the heuristic's blocks (`_blocks`), and those with a tile within MAX_TILE,
        at least MIN_PROGRAMS programs (or the narrowest columns), K in at most four steps and no step wider than
        K needs."""
        M, N, K = named_args["M"], named_args["N"], named_args["K"]
        block_m, heuristic = triton.next_power_of_2(M), _blocks(M, N, K)[1:]
        k_pow2 = max(16, triton.next_power_of_2(K))
        narrowest = min(c.kwargs["BLOCK_N"] for c in configs)
        kept = [
            c
            for c in configs
            if block_m * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= MAX_TILE
            and (triton.cdiv(N, c.kwargs["BLOCK_N"]) >= MIN_PROGRAMS or c.kwargs["BLOCK_N"] == narrowest)
            and k_pow2 // 4 <= c.kwargs["BLOCK_K"] <= k_pow2
        ]
        if all((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) != heuristic for c in kept):
            kept.append(triton.Config(dict(zip(("BLOCK_N", "BLOCK_K"), heuristic)), num_warps=4))
        return kept

    _gemv_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4)
            for n in (2, 4, 8, 16)
            for k in (256, 512, 1024, 2048)
        ],
        key=["M", "N", "K"],
        prune_configs_by={"early_config_prune": _keep_configs},
    )(_gemv_kernel)


def _blocks(M: int, N: int, K: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K): all rows; columns per program so that there are about 2 * MIN_PROGRAMS
    programs; K in as few steps as keep the (rows x columns x K) product within TILE elements (registers), so
    that each program has most of its loads in flight at once. The one configuration in Triton's interpreter."""
    block_m = triton.next_power_of_2(M)
    block_n = max(1, min(triton.next_power_of_2(triton.cdiv(N, 2 * MIN_PROGRAMS)), 16, TILE // (block_m * 256)))
    block_k = max(16, min(1024, triton.next_power_of_2(K), TILE // (block_m * block_n)))
    return block_m, block_n, block_k


@torch.library.custom_op("hydralm::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) with at most MAX_ROWS rows in all, weight (N, K) -> (..., N) in x's dtype, as F.linear(x, weight).
    A custom op: torch.compile(fullgraph=True) keeps it as one call. On a GPU one-row calls autotune the
    column and K blocks per (N, K) on the first call of each shape (a CUDA-graph decoder's warm-up step runs it);
    calls of several rows (speculative verification, batched decode) take the heuristic's (`_blocks`)."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows; got {M} (use F.linear)")
    weight = weight.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = _blocks(M, N, K)
    args = (x2, weight, y, M, N, K, x2.stride(0), weight.stride(0), y.stride(0))
    if M == 1 and not interpreting():  # one row (batch-1 decode): the blocks timed on the GPU
        _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, BLOCK_M=block_m)
    else:
        _gemv_kernel[(triton.cdiv(N, block_n),)](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], N)


@gemv.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
