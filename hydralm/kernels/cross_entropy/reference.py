"""The plain form: the whole (N, V) logits, then torch's cross-entropy (the test oracle)."""

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T`` (fp32 logits) over the rows whose label is not ``ignore_index``.

    Unlike ``F.cross_entropy``'s mean, a batch with every row ignored gives 0 (not NaN), as the chunked form does.
    """
    logits = (hidden @ weight.T).float()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)
