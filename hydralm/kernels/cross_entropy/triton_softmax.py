"""The elementwise part of the chunked linear + cross-entropy as two Triton kernels (HYDRALM_CROSS_ENTROPY=triton).

In chunked.py's PyTorch form each chunk's logits come out of the matmul in its dtype (bf16 under autocast), are
copied to fp32, and then pass through logsumexp forward and sub / exp / scatter / mul / cast backward: about
seven passes over a (chunk, V) tensor; at V = 32000 and 64k rows their bytes alone would take ~30 ms of an
H200's training step (an estimate from the bytes moved, not yet timed).
Here one program per row streams that row of logits once:

    forward   lse = logsumexp(logits[r]) and picked = logits[r, label]       (online max / sum, fp32)
    backward  g[r] = (exp(logits[r] - lse) - onehot(label)) * coef[r]     written over the logits, in their dtype
              coef[r] = dloss / n_valid for rows that count, 0 for ignored rows

The arithmetic is chunked.py's: fp32 from the matmul's output values, one rounding to the logits' dtype at the
end. The kernels run under TRITON_INTERPRET=1 on CPU tensors, which is how the tests compare them.
"""

import torch

from hydralm.kernels.triton_common import tl, triton

BLOCK = 2048  # logits per step of a row's loop


if triton is not None:

    @triton.jit
    def _this_row(logits_ptr, labels_ptr, stride_row, BLOCK: tl.constexpr):
        """This program's row: its index, where its logits start, the column offsets of one step, its label."""
        row = tl.program_id(0).to(tl.int64)
        return row, logits_ptr + row * stride_row, tl.arange(0, BLOCK), tl.load(labels_ptr + row)

    @triton.jit
    def _lse_pick_kernel(logits_ptr, labels_ptr, lse_ptr, picked_ptr, V, stride_row, ignore_index,
                         BLOCK: tl.constexpr):  # fmt: skip
        row, base, cols, label = _this_row(logits_ptr, labels_ptr, stride_row, BLOCK)
        m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)  # per lane: running max and sum of exp(x - max)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for v0 in range(0, V, BLOCK):
            x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            alive = m_new > float("-inf")  # a lane that has seen no logit yet adds nothing (no -inf - -inf)
            s = tl.where(alive, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
            m = m_new
        row_max = tl.max(m, 0)
        total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - row_max), 0.0), 0)
        tl.store(lse_ptr + row, row_max + tl.log(total))
        target = tl.where(label == ignore_index, 0, label)
        tl.store(picked_ptr + row, tl.load(base + target).to(tl.float32))

    @triton.jit
    def _softmax_grad_kernel(logits_ptr, labels_ptr, lse_ptr, scale_ptr, V, stride_row, ignore_index,
                             BLOCK: tl.constexpr):  # fmt: skip
        row, base, cols, label = _this_row(logits_ptr, labels_ptr, stride_row, BLOCK)
        coef = tl.where(label == ignore_index, 0.0, tl.load(scale_ptr))
        lse = tl.load(lse_ptr + row)
        for v0 in range(0, V, BLOCK):
            mask = v0 + cols < V
            x = tl.load(base + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(v0 + cols == label, 1.0, 0.0)) * coef
            tl.store(base + v0 + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def lse_and_picked(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """(logsumexp of each row, the logit at its label) in fp32 for (rows, V) logits; an ignored row picks column
    0 (its loss term is masked by the caller)."""
    rows, V = logits.shape
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    picked = torch.empty_like(lse)
    if rows:
        _lse_pick_kernel[(rows,)](logits, labels, lse, picked, V, logits.stride(0), ignore_index, BLOCK=BLOCK)
    return lse, picked


def softmax_minus_onehot_(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """In place: each row of (rows, V) logits becomes (softmax - onehot(label)) * scale, 0 for ignored rows.
    scale is a one-element fp32 tensor (dloss / n_valid: no host sync)."""
    rows, V = logits.shape
    if rows:
        _softmax_grad_kernel[(rows,)](
            logits, labels, lse, scale, V, logits.stride(0), ignore_index, BLOCK=BLOCK, num_warps=8
        )
    return logits
