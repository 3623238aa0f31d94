"""Linear + cross-entropy over chunks of rows, with the logits recomputed in backward.

The full (N, V) logits of a training batch (N = 64k tokens, V = 32000: 8 GiB in fp32, plus their bf16 copy and
both gradients) are the largest activation of the model. Here forward keeps only each row's logsumexp (N fp32
values); backward recomputes one chunk of logits at a time and turns it straight into that chunk's share of
the hidden and weight gradients:

    logits_c = h_c W^T                       (fp32 accumulation; under autocast the matmul runs in its dtype)
    loss     = sum_valid (lse - logits[label]) / n_valid
    dlogits  = (softmax(logits_c) - onehot(label)) * valid * dloss / n_valid
    dh_c     = dlogits W          dW += dlogits^T h_c    (dW accumulated in fp32)

Peak extra memory is a few (chunk, V) fp32 buffers instead of (N, V) ones. With `fused_softmax` the
elementwise steps (logsumexp forward; softmax - onehot, scale and cast backward) run as triton_softmax.py's
kernels on the matmul's output, one pass each, and the buffers are (chunk, V) in the matmul's dtype.
"""

from typing import Optional, Tuple

import torch

from hydralm.kernels.cross_entropy import triton_softmax

# Rows per chunk when the caller does not say: about 2^26 logits (256 MiB in fp32) per chunk.
TARGET_CHUNK_ELEMENTS = 1 << 26


def default_chunk_rows(n_rows: int, vocab_size: int) -> int:
    return max(1, min(n_rows, TARGET_CHUNK_ELEMENTS // max(vocab_size, 1)))


def _chunk_terms(
    h_c: torch.Tensor, weight: torch.Tensor, labels_c: torch.Tensor, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits of one chunk, the rows that count, and their labels with ignored rows set to 0."""
    logits = (h_c @ weight.T).float()
    valid = labels_c != ignore_index
    return logits, valid, torch.where(valid, labels_c, 0)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_rows: int, compute_dtype, fused_softmax: bool):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        lse = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            if fused_softmax:
                lse[rows], picked = triton_softmax.lse_and_picked(h[rows] @ w.T, labels[rows], ignore_index)
                valid = labels[rows] != ignore_index
            else:
                logits, valid, target = _chunk_terms(h[rows], w, labels[rows], ignore_index)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, target[:, None])[:, 0]
            total += torch.where(valid, lse[rows] - picked, 0.0).sum()
        count = (labels != ignore_index).sum().clamp(min=1)
        ctx.save_for_backward(h, w, labels, lse, count)
        ctx.meta = (ignore_index, chunk_rows, hidden.dtype, weight.dtype, fused_softmax)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, labels, lse, count = ctx.saved_tensors
        ignore_index, chunk_rows, hidden_dtype, weight_dtype, fused_softmax = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty(h.shape, device=h.device, dtype=hidden_dtype) if need_h else None
        grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_w else None
        scale = grad_loss.float() / count
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            if fused_softmax:  # one pass over the recomputed logits, in place, in their dtype
                grad_logits = triton_softmax.softmax_minus_onehot_(
                    h[rows] @ w.T, labels[rows], lse[rows], scale.reshape(1), ignore_index
                )
            else:
                logits, valid, target = _chunk_terms(h[rows], w, labels[rows], ignore_index)
                # softmax - onehot, in place on the recomputed logits: one (chunk, V) fp32 buffer
                grad_logits = logits.sub_(lse[rows, None]).exp_()
                grad_logits.scatter_add_(1, target[:, None], torch.full_like(lse[rows, None], -1.0))
                grad_logits.mul_((valid * scale)[:, None])
                grad_logits = grad_logits.to(h.dtype)
            if need_h:
                grad_h[rows] = grad_logits @ w
            if need_w:
                grad_w += grad_logits.T @ h[rows]  # an fp32 += bf16 add: no separate fp32 copy of the product
        return grad_h, (grad_w.to(weight_dtype) if need_w else None), None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: Optional[int] = None,
    fused_softmax: bool = False,
) -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T`` over rows whose label is not ``ignore_index`` (0 if there are none).

    hidden (N, d), weight (V, d), labels (N,). Under autocast the matmuls run in the autocast dtype (as
    ``nn.Linear`` would); logsumexp, softmax and the weight gradient's accumulation stay fp32.
    fused_softmax: the elementwise steps in triton_softmax.py's kernels (CUDA, or CPU under TRITON_INTERPRET=1).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    rows = chunk_rows or default_chunk_rows(hidden.shape[0], weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(
            hidden, weight, labels, ignore_index, rows, compute_dtype, fused_softmax
        )
