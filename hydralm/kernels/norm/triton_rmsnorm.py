"""RMSNorm forward and backward as one Triton kernel each (HYDRALM_NORM=triton): `rms_norm_triton`.

The PyTorch form (modules/rmsnorm.py, `_RMSNormFunction`) makes about six fp32 passes over the (rows, d)
tensor forward and ten backward; at 64k tokens x d 768 each pass moves ~400 MB, and a block has two norms. Here
each program normalises a few whole rows in registers: forward reads x once and writes y, the copy of x that
backward keeps (x itself, or under autocast an fp32 x in the autocast dtype, as `_kept` says) and 1 / rms;
backward reads that copy, 1 / rms and dy once and writes dx and one partial dweight row per program, which
PyTorch then sums in a fixed order (no atomics: the weight's gradient is deterministic).

Same arithmetic as `_RMSNormFunction` (fp32; fp64 inputs take the PyTorch form): x_hat = x * rstd, y = x_hat * w,
dx = rstd * (dy w - x_hat mean(dy w x_hat)), dw = sum over rows of dy x_hat, with x_hat recomputed from the kept
copy. The kernels run under TRITON_INTERPRET=1 on CPU tensors, which is how the tests compare them.
"""

from typing import Optional

import torch

from hydralm.kernels.triton_common import tl, triton

ROWS = 4  # rows per program: a 768-wide fp32 row is 3 KiB, so a program's tiles stay in registers


if triton is not None:

    @triton.jit
    def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, kept_ptr, rstd_ptr, M, N, eps,
                            ROWS: tl.constexpr, BLOCK: tl.constexpr, KEEP_COPY: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        x_in = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        if KEEP_COPY:  # the kept copy is what backward recomputes x_hat from
            tl.store(kept_ptr + offsets, x_in.to(kept_ptr.dtype.element_ty), mask=mask)
        x = x_in.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / N + eps)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + offsets, (x * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)

    @triton.jit
    def _rmsnorm_bwd_kernel(kept_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_part_ptr, M, N, rows_per_program,
                            ROWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """One program: rows [pid * rows_per_program, ...) in steps of ROWS; its share of dweight in one row of
        dw_part."""
        cols = tl.arange(0, BLOCK)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first = tl.program_id(0) * rows_per_program
        for r0 in range(first, first + rows_per_program, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            in_range = (rows < M) & (rows < first + rows_per_program)
            mask = in_range[:, None] & (cols < N)[None, :]
            offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
            rstd = tl.load(rstd_ptr + rows, mask=in_range, other=0.0)
            x_hat = tl.load(kept_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dw += tl.sum(dy * x_hat, 0)
            g = dy * w[None, :]
            dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, 1) / N)[:, None])
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_part_ptr + tl.program_id(0) * N + cols, dw, mask=cols < N)


def _block(N: int) -> int:
    return max(16, triton.next_power_of_2(N))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, kept_dtype: Optional[torch.dtype], out_dtype: Optional[torch.dtype]):
        shape, N = x.shape, x.shape[-1]
        x2 = x.reshape(-1, N).contiguous()
        M = x2.shape[0]
        y = torch.empty(M, N, device=x.device, dtype=out_dtype or x.dtype)
        keep_copy = kept_dtype is not None and kept_dtype != x.dtype
        kept = torch.empty(M, N, device=x.device, dtype=kept_dtype) if keep_copy else x2
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        block = _block(N)
        _rmsnorm_fwd_kernel[(triton.cdiv(M, ROWS),)](
            x2, weight, y, kept, rstd, M, N, eps, ROWS=ROWS, BLOCK=block, KEEP_COPY=keep_copy,
            num_warps=_warps(block),
        )  # fmt: skip
        ctx.save_for_backward(kept, weight, rstd)
        ctx.x_dtype = x.dtype
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        kept, weight, rstd = ctx.saved_tensors
        M, N = kept.shape
        dy2 = dy.reshape(M, N).contiguous()
        dx = torch.empty(M, N, device=kept.device, dtype=ctx.x_dtype)
        # enough programs to fill the GPU, each over a run of rows, so dweight is summed over few partial rows
        programs = max(1, min(triton.cdiv(M, ROWS), 4 * _sm_count(kept.device)))
        rows_per_program = triton.cdiv(triton.cdiv(M, programs), ROWS) * ROWS
        programs = triton.cdiv(M, rows_per_program)
        dw_part = torch.empty(programs, N, device=kept.device, dtype=torch.float32)
        block = _block(N)
        _rmsnorm_bwd_kernel[(programs,)](
            kept, weight, rstd, dy2, dx, dw_part, M, N, rows_per_program, ROWS=ROWS, BLOCK=block,
            num_warps=_warps(block),
        )  # fmt: skip
        return dx.reshape(dy.shape), dw_part.sum(0).to(weight.dtype), None, None, None


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: a few programs, so the tests cover the partial-row sum
    return torch.cuda.get_device_properties(device).multi_processor_count


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    kept_dtype: Optional[torch.dtype] = None,
    out_dtype: Optional[torch.dtype] = None,
):
    """RMSNorm(x) * weight over the last dimension, in `out_dtype` (default x's; fp32 arithmetic); backward keeps
    x, or a copy of it in `kept_dtype` (what `_RMSNormFunction` keeps under autocast), and 1 / rms per row."""
    if triton is None:
        raise RuntimeError("rms_norm_triton needs the `triton` package")
    return _TritonRMSNorm.apply(x, weight, float(eps), kept_dtype, out_dtype)
