"""Answer-chunk routing loss: gradient for the ranking that top-k routing cannot give itself.

Top-k routing picks chunks by q . summary and returns integer ids, so the scores never reach the loss: keys
learn only from the chunks already chosen, and a chunk the router never picks cannot become more pickable.
On a synthetic QA batch the chunk holding each answer is known (``source_positions``). This loss is the
cross-entropy of the router's scores at each answer-bearing query token (q . summary as a cosine, times a
fixed temperature), as a softmax over the chunks that token may pick, with the answer's chunk as the target.
Queries whose answer is in their local context (own or previous chunk: read anyway) are skipped. It reads
only q and the chunk summaries the layer already has: O(queries * chunks * D) per layer, training only; the
forward pass is unchanged (HydraConfig.retrieval_routing_loss, off by default; hydralm/training/lit_module.py
hands it the batch's answer positions).
"""

import torch
import torch.nn.functional as F

ROUTING_LOSS_TEMPERATURE = 10.0  # cosine scale: a logit gap of up to 20 between chunks


def answer_routing_loss(
    q: torch.Tensor,
    summaries: torch.Tensor,
    query_positions: torch.Tensor,
    source_positions: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """q (B, H, N, D) queries of a whole sequence; summaries (B, H_kv, n, D) its completed chunks' mean keys;
    query_positions / source_positions (B, Q) where answers are asked and where they sit. Returns the mean
    cross-entropy over (row, head, far query), or 0 (with a graph) when no answer lies beyond the local context."""
    B, H, _, D = q.shape
    h_kv, n = summaries.shape[1], summaries.shape[2]
    own, answer = query_positions // chunk_size, source_positions // chunk_size
    far = answer < own - 1  # B, Q
    if n == 0 or not bool(far.any()):
        return q.sum() * 0.0
    at = query_positions[:, None, :, None].expand(B, H, -1, D)
    # Cosine scores at a fixed temperature, bounded: with raw q . summary logits the routing was learned but the
    # answers stayed at chance (docs/claims.md, "Does routing learn?"); a cosine cannot reward growing |q|, |k|.
    rows = F.normalize(q.gather(2, at).float(), dim=-1)
    keys = F.normalize(summaries.repeat_interleave(H // h_kv, dim=1).float(), dim=-1)
    scores = ROUTING_LOSS_TEMPERATURE * rows @ keys.transpose(-1, -2)
    eligible = torch.arange(n, device=q.device) < (own - 1)[:, None, :, None]  # B, 1, Q, n
    scores = scores.masked_fill(~eligible, float("-inf"))  # B, H, Q, n
    scores = scores.masked_fill(~far[:, None, :, None], 0.0)  # local queries (weight 0) stay finite
    target = answer.clamp(max=n - 1)[:, None].expand(B, H, -1)
    losses = F.cross_entropy(scores.flatten(0, 2), target.flatten(), reduction="none").view(B, H, -1)
    weights = far[:, None].expand(B, H, -1).float()
    return (losses * weights).sum() / weights.sum()
