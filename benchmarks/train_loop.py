"""The real training loop on a GPU: `python -m benchmarks.train_loop [T]x[B] [steps] [extra train.py overrides]`.

Runs `python train.py model=160m trainer=gpu` on the synthetic long-context task at T tokens x B rows (default
16384x4) for `steps` steps (default 40) with validation, testing and checkpoint files off, then reads the run's
csv/metrics.csv: peak GPU memory (`train/peak_mem_gib`, weights + optimizer state + activations) and the loop's
tokens/s (`train/tokens_per_sec`, median over the logged steps after the first tenth, i.e. with the
dataloader, logging and Lightning's own overhead). Both go to the benchmark record:
    peak_gib/train-160m/<T>x<B>, train_loop_ktok_s/HydraLM-160m/<T>x<B> (peer: the benchmark step,
    train_ktok_s/HydraLM-160m/<T>, when the record has it); with `activation_checkpointing=true` among the
    overrides the keys are peak_gib/train-160m-checkpointing/<T>x<B> and
    train_loop_ktok_s/HydraLM-160m-checkpointing/<T>x<B> (`-checkpointing0.5` for a fraction of 0.5); with
    `compile=true` they get `-compiled`, and train_startup_s/HydraLM-160m-compiled/<T>x<B> is the seconds from the
    process's start to its end minus its steps at the median rate (start-up and compiles, with the process's exit).
"""

import csv
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import record


def main(argv: list) -> int:
    shape = argv[0] if argv else "16384x4"
    steps = int(argv[1]) if len(argv) > 1 else 40
    T, B = (int(n) for n in shape.split("x"))
    out_dir = tempfile.mkdtemp(prefix="train_loop_")
    command = [
        sys.executable, "train.py", "model=160m", "trainer=gpu", f"data.task_kwargs.seq_len={T}",
        f"data.batch_size={B}", "data.task_kwargs.num_facts=32", "data.task_kwargs.num_queries=8",
        "data.task_kwargs.key_len=2", "data.curriculum=null", f"trainer.max_steps={steps}",
        "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "test=false", "print_config=false",
        "trainer.log_every_n_steps=1", "optimizer.lr=6e-4", f"hydra.run.dir={out_dir}",
        # no checkpoint files: writing a 160m model with its optimizer state after the timed steps only costs time
        "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null", "++trainer.enable_checkpointing=false",
        *argv[2:],
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall_s = time.perf_counter() - started
    metrics = glob.glob(os.path.join(out_dir, "**", "metrics.csv"), recursive=True)
    if not metrics:
        print(f"no metrics.csv under {out_dir}", file=sys.stderr)
        return 1
    with open(metrics[0]) as f:
        rows = list(csv.DictReader(f))
    peak = max(float(r["train/peak_mem_gib"]) for r in rows if r.get("train/peak_mem_gib"))
    rates = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
    rate = statistics.median(rates[len(rates) // 10 + 1 :] or rates)
    print(f"train.py 160m {shape}: peak {peak:.1f} GiB, {rate / 1e3:.1f} ktok/s (median of {len(rates)} steps)")
    # checkpointing trades time for memory: its figures get their own keys beside the default run's
    setting = next((a.split("=", 1)[1] for a in argv[2:] if a.startswith("activation_checkpointing=")), "false")
    variant = {"false": "", "true": "-checkpointing"}.get(setting.lower(), f"-checkpointing{setting}")
    compiled = any(a.lower() in ("compile=true", "compile=auto") for a in argv[2:])
    variant += "-compiled" if compiled else ""
    record.record(f"peak_gib/train-160m{variant}/{shape}", peak, "GiB")
    record.record(
        f"train_loop_ktok_s/HydraLM-160m{variant}/{shape}", rate / 1e3, "ktok/s", peer=f"train_ktok_s/HydraLM-160m/{T}"
    )
    if compiled:  # the loop's wall time minus its steps at the median rate: start-up, compiles included
        startup_s = wall_s - steps * T * B / rate
        print(f"start-up with compile: {startup_s:.0f} s (wall {wall_s:.0f} s)")
        record.record(f"train_startup_s/HydraLM-160m{variant}/{shape}", startup_s, "s")
    record.write()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
