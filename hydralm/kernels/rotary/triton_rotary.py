"""The rotary position embedding of q and k as one Triton kernel, forward and backward (HYDRALM_ROTARY=triton):
`rotary_triton`.

The PyTorch form (modules/rotary.py, `Rotary.forward`) concatenates the cos and sin tables to the full head
size, builds rotate_half(x) = (-x2 | x1) with a neg and a cat, and then casts x and it to fp32, multiplies, adds
and casts back: about seven passes over each of q and k forward and as many backward, in every attention layer.
Here one program rotates a block of tokens of one (batch, head) row in registers: forward reads x (any strides
on its first three dimensions, the layer's view of the qkv output) and the (N, D/2) tables once and writes the
rotated x, contiguous; backward does the same with the output's gradient.

Same arithmetic as the PyTorch form, in fp32 (stored in x's dtype), with x1, x2 the two halves of the head and
c, s the tables at the token's position: out1 = x1 c - x2 s, out2 = x2 c + x1 s. A rotation's transpose is its
inverse, so backward is the same kernel rotating by minus the angle: dx1 = g1 c + g2 s, dx2 = g2 c - g1 s. The
kernel runs under TRITON_INTERPRET=1 on CPU tensors, which is how the tests compare it.
"""

import torch

from hydralm.kernels.triton_common import tl, triton

TILE = 2048  # token x half-head values per program: 64 tokens at head size 64, held in registers
WARPS = 4
MAX_GRID_Y = 65535  # CUDA's limit on the grid's second dimension, which walks the (batch, head) rows


if triton is not None:

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, N, stride_b, stride_h, stride_n, HALF: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):  # fmt: skip
        """Tokens [pid0 * BLOCK_N, ...) of row pid1 = b * H + h of x (B, H, N, 2 HALF; unit last stride) into the
        contiguous out; INVERSE rotates by minus the angle (backward)."""
        row = tl.program_id(1)
        tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_HALF)
        mask = (tokens < N)[:, None] & (cols < HALF)[None, :]
        token_ids = tokens[:, None].to(tl.int64)  # 64-bit offsets: B H N D passes 2^31 at long contexts
        b, h = (row // H).to(tl.int64), (row % H).to(tl.int64)
        x_offsets = b * stride_b + h * stride_h + token_ids * stride_n + cols[None, :]
        out_offsets = (row.to(tl.int64) * N + token_ids) * (2 * HALF) + cols[None, :]
        table_offsets = token_ids * HALF + cols[None, :]
        x1 = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_offsets + HALF, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + table_offsets, mask=mask, other=0.0)
        s = tl.load(sin_ptr + table_offsets, mask=mask, other=0.0)
        if INVERSE:
            s = -s
        out_dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + out_offsets, (x1 * c - x2 * s).to(out_dtype), mask=mask)
        tl.store(out_ptr + out_offsets + HALF, (x2 * c + x1 * s).to(out_dtype), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, inverse: bool):
    """x (B, H, N, D), unit last stride, rotated by the tables (or by minus their angles) into a contiguous
    (B, H, N, D) tensor of `out_dtype`."""
    B, H, N, D = x.shape
    out = torch.empty(B, H, N, D, device=x.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    half = D // 2
    block_half = max(16, triton.next_power_of_2(half))  # columns past D / 2 are masked
    block_n = max(1, min(TILE // block_half, triton.next_power_of_2(N)))
    batches_per_launch = max(1, MAX_GRID_Y // H)
    for b0 in range(0, B, batches_per_launch):  # one launch unless B H passes the grid's limit
        x_part, out_part = x[b0 : b0 + batches_per_launch], out[b0 : b0 + batches_per_launch]
        grid = (triton.cdiv(N, block_n), x_part.shape[0] * H)
        _rotary_kernel[grid](
            x_part, cos, sin, out_part, H, N, x_part.stride(0), x_part.stride(1), x_part.stride(2), HALF=half,
            BLOCK_N=block_n, BLOCK_HALF=block_half, INVERSE=inverse, num_warps=WARPS,
        )  # fmt: skip
    return out


class _TritonRotary(torch.autograd.Function):
    """x (B, H, N, D) with a unit last stride, rotated; keeps only the tables for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin, x.dtype, inverse=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        return _rotate(grad_out, cos, sin, ctx.x_dtype, inverse=True), None, None


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, D) rotated by the angles whose cos and sin are the (N, D / 2) fp32 tables (no gradient flows
    to them), in x's dtype (fp32 arithmetic); the rotate-half form of modules/rotary.py. The result is
    contiguous; dx comes back in x's dtype."""
    if triton is None:
        raise RuntimeError("rotary_triton needs the `triton` package")
    N, D = x.shape[-2:]
    if D % 2 or cos.shape != (N, D // 2) or sin.shape != (N, D // 2):
        raise ValueError(
            f"rotary_triton: x {tuple(x.shape)} needs an even head size and (N, D/2) tables, got cos "
            f"{tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    shape = x.shape
    x4 = x if x.dim() == 4 else x.reshape(-1, 1, N, D)  # the batch-like dimensions as rows of one head
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    cos, sin = (t.detach().to(torch.float32).contiguous() for t in (cos, sin))
    out = _TritonRotary.apply(x4, cos, sin)
    return out if out.shape == shape else out.reshape(shape)
