"""Evaluation tasks: long-context multi-fact QA, MQAR, needle-in-a-haystack, perplexity.

Each task takes a loaded model and its settings, returns a JSON-able dict and writes figures into
`out_dir`. The synthetic tasks use the same generators as the training DataModules (test split).
"""

import math
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from hydralm.data import MQAR, Needle, RetrievalQA
from hydralm.eval.plots import accuracy_and_routing_chart, depth_bar_chart, line_plot, needle_heatmap
from hydralm.eval.scoring import task_accuracy


def long_context_qa(
    model,
    out_dir: str,
    seq_len: int = 16384,
    num_facts: int = 32,
    num_queries: int = 8,
    key_len: int = 2,
    num_samples: int = 32,
    seed: int = 0,
    chunk_size: int = 4096,
    routing: bool = True,
    checkpoint: Optional[str] = None,
) -> Dict:
    """Accuracy by fact depth and, with ``routing``, each retrieval layer's routing recall by depth (did it
    pick the chunk holding the answer?). ``checkpoint`` only names the model in the figure's title."""
    task = RetrievalQA(
        seq_len=seq_len, num_facts=num_facts, num_queries=num_queries, key_len=key_len, vocab=model.cfg.vocab_size
    )
    result = task_accuracy(model, task, num_samples, seed=seed, chunk_size=chunk_size, routing=routing)
    title = (
        f"{_short_path(checkpoint) if checkpoint else 'model'}\nmulti-fact QA (retrieval_qa, test split): "
        f"{seq_len} tokens, {num_facts} facts, {num_queries} queries, {num_samples} samples"
    )
    path = os.path.join(out_dir, "long_context_qa.png")
    if result.get("routing_recall"):
        result["figure"] = accuracy_and_routing_chart(
            result["by_depth"], result["routing_recall"], title, path, result["chance"]
        )
    else:
        result["figure"] = depth_bar_chart(result["by_depth"], title, path, result["chance"])
    result["settings"] = dict(seq_len=seq_len, num_facts=num_facts, num_queries=num_queries, num_samples=num_samples)
    return result


def _short_path(path: str, parts: int = 3) -> str:
    """The last `parts` components of a path: enough to tell runs apart in a figure title."""
    return os.path.join(*os.path.normpath(str(path)).split(os.sep)[-parts:])


def mqar(
    model,
    out_dir: str,
    seq_len: int = 512,
    n_pairs: List[int] = (8, 16, 32, 64),
    num_samples: int = 64,
    seed: int = 0,
    chunk_size: int = 4096,
) -> Dict:
    points = {}
    for pairs in n_pairs:
        task = MQAR(seq_len=seq_len, num_kv_pairs=pairs, vocab=model.cfg.vocab_size)
        points[pairs] = task_accuracy(model, task, num_samples, seed=seed, chunk_size=chunk_size)["accuracy"]
    figure = line_plot(
        list(points),
        list(points.values()),
        "key-value pairs",
        "accuracy",
        f"MQAR at {seq_len} tokens",
        os.path.join(out_dir, "mqar.png"),
    )
    return {"accuracy_by_pairs": points, "figure": figure, "settings": dict(seq_len=seq_len, num_samples=num_samples)}


def needle(
    model,
    out_dir: str,
    lengths: List[int] = (1024, 4096, 16384),
    depths: List[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    num_samples: int = 16,
    seed: int = 0,
    chunk_size: int = 4096,
) -> Dict:
    """Accuracy over length x depth; long inputs go through chunked prefill (the streaming path)."""
    grid = []
    for depth in depths:
        row = []
        for length in lengths:
            task = Needle(seq_len=length, depth=depth, vocab=model.cfg.vocab_size)
            row.append(task_accuracy(model, task, num_samples, seed=seed, chunk_size=chunk_size)["accuracy"])
        grid.append(row)
    figure = needle_heatmap(
        list(lengths),
        list(depths),
        grid,
        f"needle in a haystack ({num_samples} samples/cell)",
        os.path.join(out_dir, "needle.png"),
    )
    return {"lengths": list(lengths), "depths": list(depths), "accuracy": grid, "figure": figure}


@torch.no_grad()
def perplexity(model, datamodule, max_batches: Optional[int] = None) -> Dict:
    """Token-level perplexity on the DataModule's test split (labels -100 are skipped)."""
    datamodule.setup("test")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, batch in enumerate(datamodule.test_dataloader()):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(batch["input_ids"].to(device))["logits"]
        labels = batch["labels"].to(device)
        total += float(
            F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        )
        count += int((labels != -100).sum())
    if count == 0:
        raise ValueError("perplexity: the test split has no labelled tokens")
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}
