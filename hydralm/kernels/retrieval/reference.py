"""Readable reference of retrieval attention, from scratch with plain loops and a dense N x N mask.

It exists only to test the fast paths (gather.py, flex.py, the Triton kernels) on small inputs. Token t of
chunk i reads chunk i-1 in full, chunk i up to t, and its top_k chunks among 0 .. i-2 by q_t . mean(keys).
"""

import torch


def retrieval_mask_reference(q: torch.Tensor, k: torch.Tensor, chunk_size: int, top_k: int) -> torch.Tensor:
    """Readable reference of who reads whom: q, k (B, H, N, D), same heads -> allowed (B, H, N, N) bool.
    Plain loops; small N only."""
    B, H, N, D = q.shape
    C = chunk_size
    allowed = torch.zeros(B, H, N, N, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            summaries = [k[b, h, j * C : (j + 1) * C].float().mean(0) for j in range(N // C)]
            for t in range(N):
                i = t // C
                scores = {j: float(q[b, h, t].float() @ summaries[j]) for j in range(max(0, i - 1))}
                for j in sorted(scores, key=lambda j: -scores[j])[:top_k]:
                    allowed[b, h, t, j * C : (j + 1) * C] = True
                allowed[b, h, t, max(0, (i - 1) * C) : t + 1] = True  # chunk i-1 and chunk i up to t
    return allowed


def retrieval_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, top_k: int
) -> torch.Tensor:
    """Readable reference from scratch: q, k, v (B, H, N, D), same heads. Dense N x N mask; small N only."""
    D = q.shape[-1]
    allowed = retrieval_mask_reference(q, k, chunk_size, top_k)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
