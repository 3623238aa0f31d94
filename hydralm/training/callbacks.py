"""Training callbacks of our own (the standard ones come from Lightning)."""

import hashlib
import json
import os

import lightning as L


class SampleIdLogger(L.Callback):
    """Debug aid for data parallelism: every rank appends a content hash of each training row it sees to
    `<dir>/sample_ids_rank<r>.jsonl`. `duplicates_across_ranks(dir)` then checks that no row was trained on
    twice at the same step by two ranks (`python train.py debug=ddp_ids trainer=ddp_sim`)."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        os.makedirs(self.dirpath, exist_ok=True)
        rows = [hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=8).hexdigest() for row in batch["input_ids"]]
        with open(os.path.join(self.dirpath, f"sample_ids_rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rank": trainer.global_rank, "rows": rows}) + "\n")


def duplicates_across_ranks(dirpath: str) -> dict:
    """{step: [hashes seen by more than one rank]} over every sample_ids_rank*.jsonl in dirpath."""
    seen: dict = {}
    for name in sorted(os.listdir(dirpath)):
        if name.startswith("sample_ids_rank") and name.endswith(".jsonl"):
            with open(os.path.join(dirpath, name)) as f:
                for line in f:
                    record = json.loads(line)
                    for row in record["rows"]:
                        seen.setdefault(record["step"], {}).setdefault(row, set()).add(record["rank"])
    return {
        step: [h for h, ranks in rows.items() if len(ranks) > 1]
        for step, rows in seen.items()
        if any(len(ranks) > 1 for ranks in rows.values())
    }
