"""y = x W^T for a few rows (decoding) as one Triton kernel (backend HYDRALM_DECODE_LINEAR=gemv).

At batch 1 a decode step's matmuls read each weight once and do almost no arithmetic: they are bound by memory
bandwidth. cuBLAS runs them with tensor-core tiles made for many rows, which on an H200 read the 160m model's
weights at about 1.3 TB/s (docs/inference.md). Here each program owns a few output columns (BLOCK_N rows of W)
and streams them over K, fp32 accumulation on the CUDA cores; columns are split finely enough that every SM has
programs in flight. No split over K: each output is one program's sum.

Rows are exact: a program takes its input rows one after another with the same instructions, and the blocks
depend on (N, K) only, so row i of a several-row call is bit-identical to a one-row call of that row. Speculative
verification (3 rows at k = 2) therefore scores each drafted position with the arithmetic of a decode step, and
the later rows re-read the program's columns from cache, not from memory. (One (rows x columns x K) product
for all rows reduces in an order that changes with the row count: greedy self-drafting could then differ from
greedy decoding.) On a GPU the blocks are autotuned per (N, K) on the first call of each shape among
candidates that include the fixed heuristic's (`_blocks`, the one configuration in Triton's interpreter); two
processes that pick differently may differ in the last bits, as cuBLAS's heuristics may.

Folded ops (HYDRALM_DECODE_LINEAR=fused, modules/linear.py): the kernel can also normalise its input row (RMSNorm,
each program recomputing the row's 1 / rms from K values it reads anyway), form SwiGLU's silu(gate) * up from a
[gate | up] row, and add a residual to its output, so that no elementwise kernel runs between a block's
projections. Each folded op rounds to the activations' dtype where the PyTorch op it replaces rounds.
"""

from typing import Optional

import torch

from hydralm.kernels.triton_common import interpreting, tl, triton

MAX_ROWS = 16  # rows (tokens x batch) a call may have: a decode step, a speculative verify of a few tokens
MIN_PROGRAMS = 128  # programs a call should have at least: about one per SM on an H200 (132 SMs)
TILE = 8192  # elements of one step's (columns x K) tile per program (the heuristic's tile)
MAX_TILE = 16384  # the largest (columns x K) tile the autotuner may try (registers)


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x, w, y, M, N, K, stride_xm, stride_wn, stride_ym, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        norm_w=None, res=None, stride_rm=0, eps=0.0, NORM: tl.constexpr = False, SWIGLU: tl.constexpr = False,
        RESIDUAL: tl.constexpr = False,
    ):  # fmt: skip
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        for m in range(M):  # each row: the instructions of a one-row call (module docstring)
            x_m = x + m * stride_xm
            if NORM:  # the row's 1 / rms, in fp32 as RMSNorm.reference computes it
                squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    x_k = tl.load(x_m + ks, mask=ks < K, other=0.0).to(tl.float32)
                    squares += x_k * x_k
                rstd = 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                w_tile = tl.load(
                    w + cols[:, None] * stride_wn + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < K),
                    other=0.0,
                ).to(tl.float32)  # (BLOCK_N, BLOCK_K)
                x_row = tl.load(x_m + ks, mask=ks < K, other=0.0).to(tl.float32)  # (BLOCK_K,)
                # the folded ops round where the PyTorch ops they replace round: to the activations' dtype
                if NORM:
                    weight = tl.load(norm_w + ks, mask=ks < K, other=0.0).to(tl.float32)
                    x_row = (x_row * rstd * weight).to(y.dtype.element_ty).to(tl.float32)
                if SWIGLU:  # x holds [gate | up]: the input is silu(gate) * up
                    up = tl.load(x_m + K + ks, mask=ks < K, other=0.0).to(tl.float32)
                    silu = (x_row * tl.sigmoid(x_row)).to(y.dtype.element_ty).to(tl.float32)
                    x_row = (silu * up).to(y.dtype.element_ty).to(tl.float32)
                acc += tl.sum(w_tile * x_row[None, :], axis=1)
            out = acc.to(y.dtype.element_ty)
            if RESIDUAL:
                added = tl.load(res + m * stride_rm + cols, mask=cols < N, other=0.0).to(tl.float32)
                out = (out.to(tl.float32) + added).to(y.dtype.element_ty)
            tl.store(y + m * stride_ym + cols, out, mask=cols < N)

    def _keep_configs(configs, named_args, **kwargs):
        """The candidates for a shape: the heuristic's blocks (`_blocks`), and those with a tile within MAX_TILE,
        at least MIN_PROGRAMS programs (or the narrowest columns), K in at most four steps and no step wider than
        K needs. Independent of the row count, so that rows stay exact."""
        N, K = named_args["N"], named_args["K"]
        heuristic = _blocks(N, K)
        k_pow2 = max(16, triton.next_power_of_2(K))
        narrowest = min(c.kwargs["BLOCK_N"] for c in configs)
        kept = [
            c
            for c in configs
            if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= MAX_TILE
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
        key=["N", "K"],  # not the rows: every row count of a shape runs the same blocks
        prune_configs_by={"early_config_prune": _keep_configs},
    )(_gemv_kernel)


def _blocks(N: int, K: int, interpreter: bool = False):
    """(BLOCK_N, BLOCK_K): columns per program so that there are about 2 * MIN_PROGRAMS programs; K in as few
    steps as keep the (columns x K) tile within TILE elements (registers), so that each program has most of its
    loads in flight at once. In Triton's interpreter (its one configuration), which runs the programs one after
    another, as few programs as 16-column blocks allow."""
    programs = 1 if interpreter else 2 * MIN_PROGRAMS
    block_n = max(1, min(triton.next_power_of_2(triton.cdiv(N, programs)), 16, TILE // 256))
    block_k = max(16, min(1024, triton.next_power_of_2(K), TILE // block_n))
    return block_n, block_k


@torch.library.custom_op("hydralm::gemv", mutates_args=())
def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    residual: Optional[torch.Tensor] = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """x (..., K) with at most MAX_ROWS rows in all, weight (N, K) -> (..., N) in x's dtype, as F.linear(x, weight).
    A custom op: torch.compile(fullgraph=True) keeps it as one call. On a GPU the column and K blocks are
    autotuned per (N, K) on the first call of each shape (a CUDA-graph decoder's warm-up step runs it).

    The elementwise ops around a block's projections, folded in (each rounds where the PyTorch op it replaces
    does, so the result is that of the op sequence up to the order of one fp32 sum):
      norm_weight (K,): the input is first RMS-normalised with that weight and eps (RMSNorm.reference);
      swiglu: x is (..., 2K), [gate | up], and the input is silu(gate) * up (SwiGLU's product);
      residual (..., N): added to the output (the block's residual stream)."""
    K, N = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M = x2.shape[0]
    _check_folded(x2, K, N, norm_weight, residual, swiglu)
    weight = weight.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    res = y if residual is None else residual.reshape(M, N).contiguous()
    norm = y if norm_weight is None else norm_weight.contiguous()
    args = (x2, weight, y, M, N, K, x2.stride(0), weight.stride(0), y.stride(0))
    flags = dict(
        norm_w=norm,
        res=res,
        stride_rm=res.stride(0),
        eps=eps,
        NORM=norm_weight is not None,
        SWIGLU=swiglu,
        RESIDUAL=residual is not None,
    )
    if interpreting():
        block_n, block_k = _blocks(N, K, interpreter=True)
        _gemv_kernel[(triton.cdiv(N, block_n),)](*args, BLOCK_N=block_n, BLOCK_K=block_k, **flags)
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    return y.reshape(*x.shape[:-1], N)


def _check_folded(x2, K, N, norm_weight, residual, swiglu) -> None:
    """One clear error for inputs the kernel cannot read."""
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows; got {M} (use F.linear)")
    if x2.shape[1] != (2 * K if swiglu else K):
        raise ValueError(f"gemv: x has {x2.shape[1]} features, weight (N={N}, K={K}) needs {2 * K if swiglu else K}")
    if norm_weight is not None and (swiglu or tuple(norm_weight.shape) != (K,)):
        raise ValueError(
            f"gemv: norm_weight must be ({K},) and not combined with swiglu; got {tuple(norm_weight.shape)}"
        )
    if residual is not None and (residual.numel() != M * N or residual.dtype != x2.dtype):
        raise ValueError(
            f"gemv: residual must hold {M} x {N} values in {x2.dtype}; got {tuple(residual.shape)} {residual.dtype}"
        )


@gemv.register_fake
def _(x, weight, norm_weight=None, eps=0.0, residual=None, swiglu=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
