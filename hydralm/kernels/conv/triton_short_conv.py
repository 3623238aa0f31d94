"""The Gated DeltaNet block's short convolution, silu(depthwise causal conv(x)), as one Triton kernel forward and
two backward (HYDRALM_SHORT_CONV=triton): `short_conv_triton`.

The PyTorch form (modules/short_conv.py, `_ConvSiLU`) pads x with K - 1 zero rows, transposes it for cuDNN's conv1d
and runs silu after it; backward recomputes both under autograd. fla's causal_conv1d is the other CUDA path; these
kernels are the default. Here forward loads x's K shifted row tiles as one (rows, K, channels) tile and writes y.
Backward runs two kernels: the first recomputes z, writes dz = dy silu'(z) in x's dtype and per-program partial sums
of dw (added afterwards in a fixed order: no atomics, deterministic); the second reads dz's K shifted row tiles for
dx.

Measured at 64k tokens x 2304 channels (the 160m block's q, k, v), bf16, on an H200 (docs/benchmarks.md): forward
0.31 ms against fla's 0.41; the dz kernel 0.44 ms; dx 0.17 ms. Earlier forms of the backward: one kernel that
recomputed z at all K shifts spilled ~19 KB a thread (9.4 ms fwd+bwd against fla's 2.3, cede0f7); a dz kernel that
loaded each shifted row tile twice, for z and for dw, took 255 registers and 1.49 ms (37b0878).

With taps w[c, 0..K-1] and x[t] = 0 for t < 0:
    z[t, c] = sum_j w[c, j] x[t - (K - 1) + j, c],   y = silu(z) = z sig(z)
    dz[t] = dy[t] sig(z) (1 + z (1 - sig(z)))
    dx[t] = sum_j w[j] dz[t + (K - 1) - j],          dw[c, j] = sum_t x[t - (K - 1) + j, c] dz[t, c]
All in fp32; y and dx are stored in x's dtype, dw in the weight's (with dz stored in x's dtype between the two
backward kernels, a bf16 dx is within ~6e-3 of fp64 where the one-kernel version was within 2e-3). A forward
without autograd may start from a carried cache of the K - 1 previous inputs instead of zeros
(`short_conv_forward`). x may be any (B, N, C) view whose channels are contiguous (the slice of the fused input
projection's output the block passes). The kernels run under TRITON_INTERPRET=1 on CPU tensors, which is how the
tests compare them with the PyTorch form.
"""

from typing import Optional

import torch

from hydralm.kernels.triton_common import tl, triton

# (tokens, channels) per tile and warps per program, each kernel's fastest in a sweep over 8 / 16 / 32 rows x 64 / 128 /
# 256 channels x 4 / 8 warps at 64k x 2304 on an H200 (`python -m benchmarks.speed short_conv_tiles`, 3e5d3f2)
FORWARD_TILE = (16, 256, 8)  # 0.307 ms (8 x 256 x 4: 0.303, within the sweep's noise)
DZ_TILE = (8, 128, 4)  # 0.442 ms with 16 row tiles a program (16 x 128 x 4: 0.457 with 1, 0.509 with 16)
DX_TILE = (16, 128, 4)  # 0.168 ms
TILES_PER_PROGRAM = 16  # the dz kernel: row tiles one program walks, summing its dw in registers


if triton is not None:

    @triton.jit
    def _windows(base_ptr, row0, local, shifts, s_n, lo, hi, mask_c, cols):
        """rows row0 + local + shifts[j] of a tensor as one (ROWS, KP, COLS) fp32 tile: those in lo .. hi - 1 loaded,
        zero elsewhere (and for padded taps, whose shift is set out of range). base_ptr points at row row0 (which
        may lie outside the tensor: only loaded rows are read); the offsets from it are 32-bit."""
        r = local[:, None] + shifts[None, :]
        mask = ((row0 + r >= lo) & (row0 + r < hi))[:, :, None] & mask_c[None, None, :]
        offsets = (r * s_n)[:, :, None] + cols[None, None, :]
        return tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _taps(w_ptr, cols, mask_c, K: tl.constexpr, KP: tl.constexpr):
        """The weight as a (KP, COLS) fp32 tile, taps j < K (zero beyond)."""
        j = tl.arange(0, KP)
        mask = (j < K)[:, None] & mask_c[None, :]
        return tl.load(w_ptr + cols[None, :] * K + j[:, None], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _past_shifts(N, K: tl.constexpr, KP: tl.constexpr):
        """Tap j reads row t - (K - 1) + j; padded taps get a shift that no row reaches."""
        j = tl.arange(0, KP)
        return tl.where(j < K, j - (K - 1), -N - KP)

    @triton.jit
    def _tile(C, ROWS: tl.constexpr, COLS: tl.constexpr):
        """This program's tile: (first row, row offsets, channels, batch row, channel mask)."""
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        return tl.program_id(0) * ROWS, tl.arange(0, ROWS), cols, tl.program_id(2).to(tl.int64), cols < C

    @triton.jit
    def _store_tile(ptr, value, b, s_b, s_n, row0, local, cols, N, mask_c):
        mask = (row0 + local < N)[:, None] & mask_c[None, :]
        base = ptr + b * s_b + row0.to(tl.int64) * s_n
        tl.store(base + (local * s_n)[:, None] + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _conv_fwd_kernel(x_ptr, cache_ptr, w_ptr, y_ptr, N, C, s_xb, s_xn, s_cb, s_cn, s_yb, s_yn,
                         HAS_CACHE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr,
                         COLS: tl.constexpr):  # fmt: skip
        """y for one tile; rows before the first come from the cache (HAS_CACHE) or are zeros."""
        row0, local, cols, b, mask_c = _tile(C, ROWS, COLS)
        x_base = x_ptr + b * s_xb + row0.to(tl.int64) * s_xn
        shifts = _past_shifts(N, K, KP)
        x = _windows(x_base, row0, local, shifts, s_xn, 0, N, mask_c, cols)
        if HAS_CACHE:  # rows -(K - 1) .. -1 are the cache's rows 0 .. K - 2
            cache_base = cache_ptr + b * s_cb + (row0 + K - 1).to(tl.int64) * s_cn
            x += _windows(cache_base, row0, local, shifts, s_cn, -(K - 1), 0, mask_c, cols)
        z = tl.sum(x * _taps(w_ptr, cols, mask_c, K, KP)[None, :, :], axis=1)
        _store_tile(y_ptr, z * tl.sigmoid(z), b, s_yb, s_yn, row0, local, cols, N, mask_c)

    @triton.jit
    def _row_tile(base_ptr, row0, local, s_n, N, mask_c, cols):
        """Rows row0 + local of a tensor (fp32; zero from row N on); base_ptr points at row row0."""
        mask = (row0 + local < N)[:, None] & mask_c[None, :]
        return tl.load(base_ptr + (local * s_n)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _conv_bwd_dz_kernel(x_ptr, w_ptr, dy_ptr, dz_ptr, dw_part_ptr, N, C, s_xb, s_xn, s_dyb, s_dyn, s_dzb,
                            TILES, K: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr,
                            COLS: tl.constexpr):  # fmt: skip
        """dz = dy silu'(z) (contiguous (B, N, C), in dz's dtype) for TILES row tiles of one channel tile, and their
        dw sums in dw_part[program row, b, c, j] (KP: K rounded up to a power of two). x's windows are loaded once
        a tile, as the forward loads them, and serve both z and dw (module docstring: loading them twice was
        register-bound)."""
        pid_t = tl.program_id(0)
        _, local, cols, b, mask_c = _tile(C, ROWS, COLS)  # its first row is per tile of the loop below
        shifts = _past_shifts(N, K, KP)
        w = _taps(w_ptr, cols, mask_c, K, KP)
        dw = tl.zeros((KP, COLS), dtype=tl.float32)
        for tile in range(TILES):
            row0 = (pid_t * TILES + tile) * ROWS
            x = _windows(x_ptr + b * s_xb + row0.to(tl.int64) * s_xn, row0, local, shifts, s_xn, 0, N, mask_c, cols)
            z = tl.sum(x * w[None, :, :], axis=1)
            dy = _row_tile(dy_ptr + b * s_dyb + row0.to(tl.int64) * s_dyn, row0, local, s_dyn, N, mask_c, cols)
            sig = tl.sigmoid(z)
            dz = dy * sig * (1.0 + z * (1.0 - sig))  # d silu(z)/dz = sig (1 + z (1 - sig)); 0 on rows >= N
            _store_tile(dz_ptr, dz, b, s_dzb, C, row0, local, cols, N, mask_c)  # dz is contiguous
            dw += tl.sum(x * dz[:, None, :], axis=0)  # dw[j] sums x[t - (K - 1) + j] dz[t] over the tile's rows t
        part_base = ((pid_t + b * tl.num_programs(0)) * C).to(tl.int64) * K
        taps = tl.arange(0, KP)
        mask = (taps < K)[:, None] & mask_c[None, :]
        tl.store(dw_part_ptr + part_base + cols[None, :] * K + taps[:, None], dw, mask=mask)

    @triton.jit
    def _conv_bwd_dx_kernel(dz_ptr, w_ptr, dx_ptr, N, C, s_dxb, s_dxn,
                            K: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):  # fmt: skip
        """dx[t] = sum_j w[j] dz[t + (K - 1) - j] for one tile."""
        row0, local, cols, b, mask_c = _tile(C, ROWS, COLS)
        j = tl.arange(0, KP)
        ahead = tl.where(j < K, K - 1 - j, N + KP)  # tap j reaches dx[t] from dz[t + K - 1 - j]
        dz = _windows(dz_ptr + (b * N + row0) * C, row0, local, ahead, C, 0, N, mask_c, cols)
        dx = tl.sum(dz * _taps(w_ptr, cols, mask_c, K, KP)[None, :, :], axis=1)
        _store_tile(dx_ptr, dx, b, s_dxb, s_dxn, row0, local, cols, N, mask_c)


def _weight_rows(weight: torch.Tensor) -> torch.Tensor:
    """The (C, 1, K) conv weight as contiguous (C, K) taps."""
    return weight.reshape(weight.shape[0], weight.shape[-1]).contiguous()


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def short_conv_forward(x: torch.Tensor, weight: torch.Tensor, cache: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(causal depthwise conv(x)): x (B, N, C), weight (C, 1, K) -> (B, N, C) in x's dtype. The rows before the
    first are the cache's (B, K - 1, C) (a stream's previous inputs, any float dtype) or zeros. No autograd."""
    x = _channels_contiguous(x)
    B, N, C = x.shape
    K = weight.shape[-1]
    if cache is not None and cache.shape != (B, K - 1, C):
        raise ValueError(f"the conv cache must have shape {(B, K - 1, C)}, got {tuple(cache.shape)}")
    y = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    if y.numel() > 0:
        rows, cols, warps = FORWARD_TILE
        held = x if cache is None else _channels_contiguous(cache)  # a placeholder pointer without a cache
        _conv_fwd_kernel[(triton.cdiv(N, rows), triton.cdiv(C, cols), B)](
            x, held, _weight_rows(weight), y, N, C, x.stride(0), x.stride(1), held.stride(0), held.stride(1),
            y.stride(0), y.stride(1), HAS_CACHE=cache is not None, K=K, KP=triton.next_power_of_2(K), ROWS=rows,
            COLS=cols, num_warps=warps,
        )  # fmt: skip
    return y


def short_conv_backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor):
    """(dx in x's dtype, dw in the weight's dtype and shape) of short_conv_forward's output for its gradient dy:
    one kernel writes dz = dy silu'(z) (in x's dtype) and the dw partial sums, a second reads dz back for dx."""
    x, dy = _channels_contiguous(x), _channels_contiguous(dy)
    B, N, C = x.shape
    K = weight.shape[-1]
    dx = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    if dx.numel() == 0:
        return dx, torch.zeros_like(weight)
    taps = _weight_rows(weight)
    dz = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    KP = triton.next_power_of_2(K)
    rows, cols, warps = DZ_TILE
    programs_t = triton.cdiv(triton.cdiv(N, rows), TILES_PER_PROGRAM)
    dw_part = torch.empty(B * programs_t, C, K, device=x.device, dtype=torch.float32)
    _conv_bwd_dz_kernel[(programs_t, triton.cdiv(C, cols), B)](
        x, taps, dy, dz, dw_part, N, C, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dz.stride(0),
        TILES_PER_PROGRAM,
        K=K, KP=KP, ROWS=rows, COLS=cols, num_warps=warps,
    )  # fmt: skip
    rows, cols, warps = DX_TILE
    _conv_bwd_dx_kernel[(triton.cdiv(N, rows), triton.cdiv(C, cols), B)](
        dz, taps, dx, N, C, dx.stride(0), dx.stride(1), K=K, KP=KP, ROWS=rows, COLS=cols, num_warps=warps
    )
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
