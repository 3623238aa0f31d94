"""Scoring a model on token positions without materialising logits for a whole long input."""

import collections
import math
from typing import Dict, Optional, Tuple

import torch

from hydralm.data.synthetic import SyntheticTask
from hydralm.modules.routing_log import record_routing

DEPTH_BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> Tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a binomial proportion; (0, 1) when there are no trials.

    Unlike p +- z * sqrt(p (1 - p) / n) it stays inside [0, 1] and is not zero-width at p = 0 or 1, which
    matters for the small per-bucket counts of an accuracy-by-depth table.
    """
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # exact at the ends (p = 0 or 1), where rounding would otherwise leave the bound a hair inside
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


@torch.no_grad()
def predictions_at(model, input_ids: torch.Tensor, positions: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """argmax of the logits at `positions` (B, Q) of `input_ids` (B, N).

    The input is fed in chunks of `chunk_size` with carried state (exactly the parallel forward, C1), so a
    256k-token needle costs one chunk of logits at a time; an input of one chunk takes the parallel path.
    """
    B, N = input_ids.shape
    out = torch.full(positions.shape, -1, dtype=torch.long, device=input_ids.device)
    state = None
    for start in range(0, N, chunk_size):
        end = min(N, start + chunk_size)
        # bf16 autocast on a GPU, as training's bf16-mixed; fp32 on the CPU
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=input_ids.is_cuda):
            result = model(input_ids[:, start:end], state=state, return_state=end < N)
        state = result["state"]
        inside = (positions >= start) & (positions < end)
        if inside.any():
            rows, cols = inside.nonzero(as_tuple=True)
            out[rows, cols] = result["logits"][rows, positions[rows, cols] - start].argmax(-1)
    return out


def task_accuracy(
    model,
    task: SyntheticTask,
    num_samples: int,
    seed: int = 0,
    split: str = "test",
    batch_size: int = 1,
    chunk_size: int = 4096,
    device: Optional[torch.device] = None,
    routing: bool = False,
) -> Dict:
    """Answer accuracy of `model` on `num_samples` samples of a synthetic task, overall and by depth bucket,
    each with its count of correct answers and 95% Wilson interval (``ci95``), and ``chance``: the accuracy of
    guessing a value token uniformly (every answer is one).

    With ``routing=True`` the result also holds ``routing_recall``: per retrieval layer (``layer<i>``, i the
    block index), how often its routing picked the chunk holding the answer (hydralm/eval/routing_recall.py).
    """
    from hydralm.eval.routing_recall import merge_hits, routing_hits, summarize

    device = device or next(model.parameters()).device
    correct, depths, hits, wrong = [], [], {}, collections.Counter()
    values = (task.vocab.value_start, task.vocab.filler_start)
    for start in range(0, num_samples, batch_size):
        rows = [task.sample(i, split, seed) for i in range(start, min(num_samples, start + batch_size))]
        ids = torch.stack([r["input_ids"] for r in rows]).to(device)
        positions = torch.stack([r["query_positions"] for r in rows]).to(device)
        labels = torch.stack([r["labels"] for r in rows]).to(device)
        if routing:
            with record_routing(model) as logs:
                predicted = predictions_at(model, ids, positions, chunk_size)
            sources = torch.stack([r["source_positions"] for r in rows]).to(device)
            for layer, entries in logs.items():
                hits.setdefault(layer, []).append(routing_hits(entries, positions, sources))
        else:
            predicted = predictions_at(model, ids, positions, chunk_size)
        answers = labels.gather(1, positions)
        correct.append((predicted == answers).float().cpu().flatten())
        wrong.update(wrong_answer_kinds(ids, positions, predicted, answers, values))
        depths.append(torch.stack([r["depths"] for r in rows]).float())
    by_query_depth = torch.cat(depths)  # (samples, Q)
    correct, depths = torch.cat(correct), by_query_depth.flatten()
    buckets = {}
    for lo, hi in DEPTH_BUCKETS:
        inside = (depths >= lo) & ((depths < hi) if hi < 1.0 else (depths <= hi))
        buckets[f"{int(lo * 100)}-{int(hi * 100)}"] = _proportion(correct[inside])
    result = {
        **_proportion(correct),
        "chance": 1.0 / task.vocab.num_values,
        "by_depth": buckets,
        "wrong": _wrong_shares(wrong),
    }
    if routing:
        result["routing_recall"] = {
            f"layer{layer}": summarize(merge_hits(parts), by_query_depth, correct) for layer, parts in hits.items()
        }
    return result


WRONG_KINDS = ("another_value_in_context", "value_not_in_context", "not_a_value")


def wrong_answer_kinds(
    ids: torch.Tensor, positions: torch.Tensor, predicted: torch.Tensor, answers: torch.Tensor, values: Tuple[int, int]
) -> Dict[str, int]:
    """What the wrong answers were, counted: a value token that occurs in the context up to the query (the model
    read another fact: a reading error), a value token that does not (a guess), or not a value token at all.
    ids (B, N); positions / predicted / answers (B, Q); values = [first, end) of the value ids."""
    wrong = predicted != answers
    is_value = (predicted >= values[0]) & (predicted < values[1])
    before = torch.arange(ids.shape[1], device=ids.device) <= positions[..., None]  # (B, Q, N)
    seen = ((ids[:, None, :] == predicted[..., None]) & before).any(-1)
    kinds = (wrong & is_value & seen, wrong & is_value & ~seen, wrong & ~is_value)
    return {name: int(kind.sum()) for name, kind in zip(WRONG_KINDS, kinds)}


def _wrong_shares(counts: Dict[str, int]) -> Dict:
    """The number of wrong answers and each kind's share of them (None without wrong answers)."""
    total = sum(counts.get(name, 0) for name in WRONG_KINDS)
    return {"answers": total} | {name: counts.get(name, 0) / total if total else None for name in WRONG_KINDS}


def _proportion(correct: torch.Tensor) -> Dict:
    """accuracy (None without queries), queries, correct and the 95% Wilson interval of 0/1 outcomes."""
    n, k = int(correct.numel()), int(correct.sum())
    return {
        "accuracy": k / n if n else None,
        "queries": n,
        "correct": k,
        "ci95": list(wilson_interval(k, n)),
    }
