"""SwiGLU's elementwise product and its gradient as one Triton kernel each (HYDRALM_SWIGLU=triton):
`swiglu_down_triton`.

The PyTorch form (modules/swiglu.py, `_SwiGLUDown`) runs silu and a mul forward, and backward recomputes them
under autograd and then runs silu_backward and two more muls; autograd then concatenates grad_gate and grad_up
into the gradient of the gate_up output (one more copy). Here forward reads the gate_up output h (..., 2 x hidden:
gate, then up) once and writes silu(gate) * up; backward reads h and the product's gradient once and writes the
gradient of h straight into the two halves of one buffer, and the product again for the down projection's weight
gradient. Each program covers a tile of rows x hidden columns.

Same arithmetic as `_SwiGLUDown`, in fp32 (stored in h's dtype): product = silu(gate) up, with silu(g) = g sig(g);
grad_gate = dp up sig (1 + gate (1 - sig)), grad_up = dp silu(gate). The kernels run under TRITON_INTERPRET=1 on
CPU tensors, which is how the tests compare them.
"""

import torch
import torch.nn.functional as F

from hydralm.kernels.triton_common import tl, triton
from hydralm.modules.recompute import autocast_as, autocast_state

ROWS = 16  # rows per program
COLS = 256  # hidden columns per program: 16 x 256 values over 8 warps is 16 per thread, in registers
WARPS = 8


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, product_ptr, M, H, ROWS: tl.constexpr, COLS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        mask = (rows < M)[:, None] & (cols < H)[None, :]
        row_starts = rows[:, None].to(tl.int64)  # 64-bit offsets: rows x 2 hidden can pass 2^31
        gate_offsets = row_starts * (2 * H) + cols[None, :]
        gate = tl.load(h_ptr + gate_offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + gate_offsets + H, mask=mask, other=0.0).to(tl.float32)
        product = gate * tl.sigmoid(gate) * up
        tl.store(product_ptr + row_starts * H + cols[None, :], product.to(product_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(h_ptr, grad_product_ptr, grad_h_ptr, product_ptr, M, H,
                           ROWS: tl.constexpr, COLS: tl.constexpr, WRITE_PRODUCT: tl.constexpr):  # fmt: skip
        """grad_h's gate and up halves for one tile, and (WRITE_PRODUCT) the product again for dweight."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        mask = (rows < M)[:, None] & (cols < H)[None, :]
        row_starts = rows[:, None].to(tl.int64)
        gate_offsets = row_starts * (2 * H) + cols[None, :]
        product_offsets = row_starts * H + cols[None, :]
        gate = tl.load(h_ptr + gate_offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + gate_offsets + H, mask=mask, other=0.0).to(tl.float32)
        grad_product = tl.load(grad_product_ptr + product_offsets, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        grad_gate = grad_product * up * sig * (1.0 + gate * (1.0 - sig))  # d silu(g)/dg = sig (1 + g (1 - sig))
        out_dtype = grad_h_ptr.dtype.element_ty
        tl.store(grad_h_ptr + gate_offsets, grad_gate.to(out_dtype), mask=mask)
        tl.store(grad_h_ptr + gate_offsets + H, (grad_product * silu).to(out_dtype), mask=mask)
        if WRITE_PRODUCT:
            tl.store(product_ptr + product_offsets, (silu * up).to(product_ptr.dtype.element_ty), mask=mask)


def _rows_of(h: torch.Tensor) -> torch.Tensor:
    """h as a contiguous (rows, 2 x hidden) tensor (a view of the gate_up output, which is one already)."""
    return h.reshape(-1, h.shape[-1]).contiguous()


def _grid(M: int, H: int) -> tuple:
    return triton.cdiv(M, ROWS), triton.cdiv(H, COLS)


def swiglu_product(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = (gate | up) over the last dimension, in h's dtype (fp32 arithmetic)."""
    h2 = _rows_of(h)
    M, H = h2.shape[0], h2.shape[1] // 2
    product = torch.empty(M, H, device=h.device, dtype=h.dtype)
    if M > 0 and H > 0:
        _swiglu_fwd_kernel[_grid(M, H)](h2, product, M, H, ROWS=ROWS, COLS=COLS, num_warps=WARPS)
    return product.reshape(*h.shape[:-1], H)


def swiglu_product_backward(h: torch.Tensor, grad_product: torch.Tensor, write_product: bool = True):
    """(grad of h, silu(gate) * up or None) from h and the product's gradient, both in h's dtype, in one pass."""
    h2 = _rows_of(h)
    M, H = h2.shape[0], h2.shape[1] // 2
    grad_product2 = grad_product.reshape(M, H).contiguous()
    grad_h = torch.empty_like(h2)
    product = torch.empty(M, H, device=h.device, dtype=h.dtype) if write_product else None
    if M > 0 and H > 0:
        _swiglu_bwd_kernel[_grid(M, H)](
            h2, grad_product2, grad_h, product if write_product else grad_product2, M, H, ROWS=ROWS, COLS=COLS,
            WRITE_PRODUCT=write_product, num_warps=WARPS,
        )  # fmt: skip
    if product is not None:
        product = product.reshape(*h.shape[:-1], H)
    return grad_h.reshape(h.shape), product


class _TritonSwiGLUDown(torch.autograd.Function):
    """`_SwiGLUDown` (modules/swiglu.py) on the whole gate_up output: keeps h and the weight only, recomputes the
    product in backward, and runs the matmuls there under forward's autocast state."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.autocast = autocast_state(h)
        ctx.save_for_backward(h, weight)
        return F.linear(swiglu_product(h), weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        needs_h, needs_weight = ctx.needs_input_grad[:2]
        grad_h = grad_weight = None
        if needs_h:
            with autocast_as(ctx.autocast):
                grad_product = grad_out @ weight  # (..., hidden)
            grad_h, product = swiglu_product_backward(h, grad_product, write_product=needs_weight)
        elif needs_weight:
            product = swiglu_product(h)
        if needs_weight:
            with autocast_as(ctx.autocast):
                grad_weight = grad_out.flatten(0, -2).t() @ product.flatten(0, -2)  # (d_model, hidden)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_h, grad_weight


def swiglu_down_triton(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(silu(gate) * up, weight) with (gate | up) = h over the last dimension (the gate_up output: rows
    contiguous); backward keeps h and the weight only. Gradients in h's and the weight's dtypes."""
    if triton is None:
        raise RuntimeError("swiglu_down_triton needs the `triton` package")
    return _TritonSwiGLUDown.apply(h, weight)
