"""The Gated DeltaNet block's short convolution, silu(depthwise causal conv(x)), as one Triton kernel forward and
one backward (HYDRALM_SHORT_CONV=triton): `short_conv_triton`.

The PyTorch form (modules/short_conv.py, `_ConvSiLU`) pads x with K - 1 zero rows, transposes it for cuDNN's
conv1d and runs silu after it; backward recomputes both under autograd. fla's causal_conv1d (the other CUDA path)
spent about 1.1 ms per 160m layer in its backward alone at 64k tokens (H200 profile, 2026-12-01), three times what
reading x and dy and writing dx costs there. Here forward reads x's K shifted row tiles (one from memory, the rest
from cache) and writes y; backward recomputes the pre-activation z at the K rows each dx row needs, and writes dx
and per-program partial sums of dw (reduced afterwards in a fixed order: no atomics, deterministic).

With taps w[c, 0..K-1] and x[t] = 0 for t < 0:
    z[t, c] = sum_j w[c, j] x[t - (K - 1) + j, c],   y = silu(z) = z sig(z)
    dz[t] = dy[t] sig(z) (1 + z (1 - sig(z)))
    dx[t] = sum_j w[j] dz[t + (K - 1) - j],          dw[c, j] = sum_t x[t - (K - 1) + j, c] dz[t, c]
All in fp32; y and dx are stored in x's dtype, dw in the weight's. x may be any (B, N, C) view whose channels
are contiguous (the slice of the fused input projection's output the block passes). The kernels run under
TRITON_INTERPRET=1 on CPU tensors, which is how the tests compare them with the PyTorch form.
"""

import torch

from hydralm.kernels.triton_common import tl, triton

ROWS = 64  # tokens per tile
COLS = 128  # channels per tile
TILES_PER_PROGRAM = 8  # backward: row tiles one program walks, summing its dw in registers
WARPS = 4


if triton is not None:

    @triton.jit
    def _tap_rows(x_ptr, base, rows, cols, s_n, N, mask_c, shift: tl.constexpr):
        """x[rows + shift] (fp32; zero outside 0..N-1) for one tile."""
        r = rows + shift
        mask = ((r >= 0) & (r < N))[:, None] & mask_c[None, :]
        return tl.load(x_ptr + base + r[:, None].to(tl.int64) * s_n + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )

    @triton.jit
    def _pre_activation(x_ptr, w_ptr, base, rows, cols, s_n, N, mask_c, K: tl.constexpr):
        """z at `rows` for one tile: the causal conv over the K rows ending at each."""
        z = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
        for j in tl.static_range(K):
            w = tl.load(w_ptr + cols * K + j, mask=mask_c, other=0.0).to(tl.float32)
            z += _tap_rows(x_ptr, base, rows, cols, s_n, N, mask_c, j - (K - 1)) * w[None, :]
        return z

    @triton.jit
    def _conv_fwd_kernel(x_ptr, w_ptr, y_ptr, N, C, s_xb, s_xn, s_yb, s_yn,
                         K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        b = tl.program_id(2).to(tl.int64)
        mask_c = cols < C
        z = _pre_activation(x_ptr, w_ptr, b * s_xb, rows, cols, s_xn, N, mask_c, K)
        y = z * tl.sigmoid(z)
        mask = (rows < N)[:, None] & mask_c[None, :]
        offsets = b * s_yb + rows[:, None].to(tl.int64) * s_yn + cols[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _conv_bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_part_ptr, N, C, s_xb, s_xn, s_dyb, s_dyn, s_dxb, s_dxn,
                         K: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                         TILES: tl.constexpr):  # fmt: skip
        """dx for TILES row tiles of one channel tile, and their dw sums in dw_part[program row, b, c, j] (KP: K
        rounded up to a power of two, the dw tile's height)."""
        pid_t, pid_c = tl.program_id(0), tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        cols = pid_c * COLS + tl.arange(0, COLS)
        mask_c = cols < C
        x_base, dy_base = b * s_xb, b * s_dyb
        dw = tl.zeros((KP, COLS), dtype=tl.float32)
        taps = tl.arange(0, KP)
        for tile in range(TILES):
            rows = (pid_t * TILES + tile) * ROWS + tl.arange(0, ROWS)
            dx = tl.zeros((ROWS, COLS), dtype=tl.float32)
            for m in tl.static_range(K):  # dz at rows + m, which reaches dx[rows] through tap K - 1 - m
                shifted = rows + m
                z = _pre_activation(x_ptr, w_ptr, x_base, shifted, cols, s_xn, N, mask_c, K)
                dy = _tap_rows(dy_ptr, dy_base, shifted, cols, s_dyn, N, mask_c, 0)
                sig = tl.sigmoid(z)
                dz = dy * sig * (1.0 + z * (1.0 - sig))
                w = tl.load(w_ptr + cols * K + (K - 1 - m), mask=mask_c, other=0.0).to(tl.float32)
                dx += dz * w[None, :]
                if m == 0:  # dw[j] sums x[t - (K - 1) + j] dz[t] over this tile's rows t
                    for j in tl.static_range(K):
                        x_j = _tap_rows(x_ptr, x_base, rows, cols, s_xn, N, mask_c, j - (K - 1))
                        part = tl.sum(x_j * dz, axis=0)
                        dw += tl.where(taps[:, None] == j, part[None, :], 0.0)
            mask = (rows < N)[:, None] & mask_c[None, :]
            offsets = b * s_dxb + rows[:, None].to(tl.int64) * s_dxn + cols[None, :]
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        n_programs_t = tl.num_programs(0)
        part_base = ((pid_t + b * n_programs_t) * C).to(tl.int64) * K
        mask = (taps < K)[:, None] & mask_c[None, :]
        tl.store(dw_part_ptr + part_base + cols[None, :] * K + taps[:, None], dw, mask=mask)


def _weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """The (C, 1, K) conv weight as contiguous (C, K) taps."""
    return weight.reshape(weight.shape[0], weight.shape[-1]).contiguous()


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def short_conv_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv(x)) from zeros before the first token: x (B, N, C), weight (C, 1, K) -> (B, N, C)
    in x's dtype."""
    x = _channels_contiguous(x)
    B, N, C = x.shape
    y = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    if y.numel() > 0:
        grid = (triton.cdiv(N, ROWS), triton.cdiv(C, COLS), B)
        _conv_fwd_kernel[grid](
            x, _weight_rows(weight), y, N, C, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            K=weight.shape[-1], ROWS=ROWS, COLS=COLS, num_warps=WARPS,
        )  # fmt: skip
    return y


def short_conv_backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor):
    """(dx in x's dtype, dw in the weight's dtype and shape) of short_conv_forward's output for its gradient dy."""
    x, dy = _channels_contiguous(x), _channels_contiguous(dy)
    B, N, C = x.shape
    K = weight.shape[-1]
    dx = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    if dx.numel() == 0:
        return dx, torch.zeros_like(weight)
    programs_t = triton.cdiv(triton.cdiv(N, ROWS), TILES_PER_PROGRAM)
    dw_part = torch.empty(B * programs_t, C, K, device=x.device, dtype=torch.float32)
    _conv_bwd_kernel[(programs_t, triton.cdiv(C, COLS), B)](
        x, _weight_rows(weight), dy, dx, dw_part, N, C, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dx.stride(0), dx.stride(1), K=K, KP=triton.next_power_of_2(K), ROWS=ROWS, COLS=COLS,
        TILES=TILES_PER_PROGRAM, num_warps=WARPS,
    )  # fmt: skip
    dw = dw_part.sum(0).to(weight.dtype).reshape(weight.shape)
    return dx, dw


class _TritonShortConv(torch.autograd.Function):
    """Keeps x and the weight for backward, as `_ConvSiLU` does; nothing else."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return short_conv_forward(x, weight)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx, dw = short_conv_backward(x, weight, dy)
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None)


def short_conv_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv(x)) from zeros before the first token: x (B, N, C) with contiguous channels (any
    row stride), weight (C, 1, K); output and dx in x's dtype, dw in the weight's."""
    if triton is None:
        raise RuntimeError("short_conv_triton needs the `triton` package")
    return _TritonShortConv.apply(x, weight)
