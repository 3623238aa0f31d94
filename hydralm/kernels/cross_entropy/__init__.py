"""Linear + cross-entropy without the full logits, laid out by form:

reference.py  the whole (N, V) logits, then torch's cross-entropy (the test oracle)
chunked.py    chunks of rows, logits recomputed in backward (PyTorch; the default off CUDA)
triton_softmax.py  the chunks' elementwise steps as two Triton kernels (the default on CUDA)

``linear_cross_entropy`` is the one place that picks among them and, when asked through
HYDRALM_CROSS_ENTROPY (kernels/backend.py), liger-kernel's or fla's fused Triton kernels.
"""

from typing import Optional

import torch

from hydralm.kernels.backend import cross_entropy_backend
from hydralm.kernels.cross_entropy.chunked import chunked_linear_cross_entropy
from hydralm.kernels.cross_entropy.reference import linear_cross_entropy_reference

__all__ = ["chunked_linear_cross_entropy", "linear_cross_entropy", "linear_cross_entropy_reference"]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, rows labelled ``ignore_index`` left out
    (0 when every row is). hidden (N, d) or (..., d), weight (V, d), labels with hidden's leading shape."""
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden (..., d) and weight (V, d) must share d; got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    backend = cross_entropy_backend(hidden.is_cuda)
    if backend == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        loss = liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index)
        return loss[0] if isinstance(loss, tuple) else loss
    if backend == "fla":
        from fla.modules.fused_linear_cross_entropy import fused_linear_cross_entropy_loss

        return fused_linear_cross_entropy_loss(hidden, labels, weight, ignore_index=ignore_index)
    return chunked_linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_rows, backend == "triton")
