"""Scoring a model on token positions without materialising logits for a whole long input."""

from typing import Dict, Optional

import torch

from hydralm.data.synthetic import SyntheticTask

DEPTH_BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


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
) -> Dict:
    """Answer accuracy of `model` on `num_samples` samples of a synthetic task, overall and by depth bucket."""
    device = device or next(model.parameters()).device
    correct, depths = [], []
    for start in range(0, num_samples, batch_size):
        rows = [task.sample(i, split, seed) for i in range(start, min(num_samples, start + batch_size))]
        ids = torch.stack([r["input_ids"] for r in rows]).to(device)
        positions = torch.stack([r["query_positions"] for r in rows]).to(device)
        labels = torch.stack([r["labels"] for r in rows]).to(device)
        predicted = predictions_at(model, ids, positions, chunk_size)
        correct.append((predicted == labels.gather(1, positions)).float().cpu().flatten())
        depths.append(torch.stack([r["depths"] for r in rows]).float().flatten())
    correct, depths = torch.cat(correct), torch.cat(depths)
    buckets = {}
    for lo, hi in DEPTH_BUCKETS:
        inside = (depths >= lo) & ((depths < hi) if hi < 1.0 else (depths <= hi))
        buckets[f"{int(lo * 100)}-{int(hi * 100)}"] = {
            "accuracy": float(correct[inside].mean()) if inside.any() else None,
            "queries": int(inside.sum()),
        }
    return {"accuracy": float(correct.mean()), "queries": int(correct.numel()), "by_depth": buckets}
