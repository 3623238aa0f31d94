"""Token sampling shared by generation, speculative decoding and streaming.

``filtered_probs`` is the one definition of the sampling distribution (temperature, then top-k, then
top-p, as in Hugging Face's logits warpers); ``sample_next`` draws from exactly that distribution, and
speculative decoding compares target and draft through it. ``temperature <= 0`` means greedy: the
distribution is one-hot at the argmax (the first maximal index, like ``torch.argmax``).
"""

from typing import Optional

import torch


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Reject bad sampling settings with one clear message (before any model call)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature != temperature:
        raise ValueError(f"temperature must be a number (<= 0 for greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filtered_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """logits (..., V) -> fp32 logits / temperature with filtered-out tokens at -inf. Needs temperature > 0.

    top_k keeps every token whose logit is >= the k-th largest (ties at the boundary are all kept);
    top_p keeps the smallest prefix of tokens, by descending probability, whose mass reaches top_p
    (the most likely token is always kept).
    """
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def filtered_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """The exact distribution ``sample_next`` draws from: logits (..., V) -> fp32 probabilities (..., V).

    temperature <= 0: one-hot at ``logits.argmax(-1)`` (top_k / top_p do not change the argmax).
    """
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filtered_logits(logits, temperature, top_k, top_p).softmax(-1)


def sample_from_probs(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One draw per row of probs (..., V) (rows need not be normalised) -> int64 (...).

    With a generator, the draw happens on the generator's device, so a CPU generator also makes CUDA
    sampling reproducible.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    device = flat.device
    if generator is not None and generator.device != device:
        flat = flat.to(generator.device)
    draws = torch.multinomial(flat, 1, generator=generator)[:, 0]
    return draws.to(device).reshape(probs.shape[:-1])


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token per row: logits (B, V) -> int64 (B,). temperature <= 0 is greedy (no randomness used)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return sample_from_probs(filtered_probs(logits, temperature, top_k, top_p), generator)
