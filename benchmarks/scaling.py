"""One device vs data parallel at the same global batch, through `train.py` as users launch it.

    python -m benchmarks.scaling --steps 200 --devices 2 --global-batch 4 -- \\
        model=160m data=retrieval_qa data.task_kwargs.seq_len=16384 data.task_kwargs.num_facts=32
    python -m benchmarks.scaling --cpu --steps 6 -- model=tiny    # 1 process vs ddp_sim (gloo), any laptop

Runs (each `python train.py <overrides> hydra.run.dir=<out>/<name>`, per-step CSV logging):
  single   1 device, data.batch_size = global batch
  ddp      trainer=ddp, trainer.devices=N, data.batch_size = global / N      (--cpu: trainer=ddp_sim)
  fsdp     trainer=fsdp, same split                                          (GPU only)
  resumed  the ddp run again from its checkpoint at steps / 2: it must retrace the ddp run's losses
and prints one table: per-step train-loss agreement with `single` (train/loss is the global batch's loss
under DDP/FSDP), median tokens/s after warm-up, speed-up and scaling efficiency, peak GPU memory.
NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0 and friends), as shared machines require.
`--runs single` / `--runs ddp,fsdp,resumed` run a subset into the same `--out`; by default the runs not yet in
`--out` are made and the others are read, so the table can be assembled from several invocations (for
machines that bound how long one command may run).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
WARMUP_STEPS = 3


def read_metrics(run_dir: Path) -> Dict[str, Dict[int, float]]:
    """{metric: {step: value}} from a run's CSVLogger file (Lightning writes metrics of one step on several rows)."""
    metrics: Dict[str, Dict[int, float]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name != "step" and value not in ("", None):
                    metrics.setdefault(name, {})[int(row["step"])] = float(value)
    return metrics


def summarize(runs: Dict[str, Dict[str, Dict[int, float]]], devices: int) -> List[dict]:
    base_loss = runs["single"].get("train/loss", {})

    def tokens_per_sec(metrics):
        values = [v for s, v in sorted(metrics.get("train/tokens_per_sec", {}).items()) if s >= WARMUP_STEPS]
        return statistics.median(values) if values else None

    base_speed = tokens_per_sec(runs["single"])
    rows = []
    for name, metrics in runs.items():
        if name == "resumed" and "ddp" not in runs:
            continue
        reference = runs["ddp"]["train/loss"] if name == "resumed" else base_loss
        loss = metrics.get("train/loss", {})
        common = sorted(set(loss) & set(reference))
        diffs = [abs(loss[s] - reference[s]) for s in common]
        speed = tokens_per_sec(metrics)
        n = 1 if name == "single" else devices
        peak = metrics.get("train/peak_mem_gib", {})
        rows.append(
            {
                "run": name,
                "devices": n,
                "steps_compared": len(common),
                "vs": "ddp" if name == "resumed" else "single",
                "max_abs_loss_diff": max(diffs) if diffs else None,
                "median_abs_loss_diff": statistics.median(diffs) if diffs else None,
                "final_loss": loss[max(loss)] if loss else None,
                # per-step losses of a few dozen answer tokens are noisy: the mean over the last tenth compares runs
                "last_tenth_mean_loss": statistics.mean(loss[s] for s in sorted(loss)[-max(1, len(loss) // 10) :])
                if loss
                else None,
                "tokens_per_sec": speed,
                "speedup": speed / base_speed if speed and base_speed and name != "resumed" else None,
                "efficiency": speed / base_speed / n if speed and base_speed and name != "resumed" else None,
                "peak_mem_gib": max(peak.values()) if peak else None,
            }
        )
    return rows


def _train(overrides: List[str], run_dir: Path, log_file: Path, timeout: int) -> float:
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log_file, "w") as log:
        done = subprocess.run(
            [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
            cwd=str(ROOT),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed for {run_dir.name} (exit {done.returncode}); see {log_file}")
    return time.perf_counter() - started


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--cpu", action="store_true", help="1 process vs trainer=ddp_sim (2 gloo processes)")
    parser.add_argument("--no-fsdp", action="store_true")
    parser.add_argument("--out", default=None, help="output folder (default logs/scaling/<time>)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    parser.add_argument(
        "--runs",
        default=None,
        help="comma-separated runs to make now (default: those not yet in --out); others are read from --out",
    )
    parser.add_argument("overrides", nargs="*", help="train.py overrides shared by every run (after --)")
    args = parser.parse_args(argv)
    devices = 2 if args.cpu else args.devices
    if args.global_batch % devices:
        parser.error(f"--global-batch={args.global_batch} must be divisible by the {devices} devices")
    if args.steps < 2 or args.steps % 2:
        parser.error(f"--steps={args.steps} must be an even number >= 2 (the resume starts at steps / 2)")
    out = Path(args.out or ROOT / "logs" / "scaling" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    half = args.steps // 2
    common = [
        *args.overrides,
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1",
        "test=false",
        "trainer.limit_val_batches=0",
        "trainer.val_check_interval=1000000",
        "logger=csv",
        "callbacks.rich_progress_bar=null",
        "++trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        f"+callbacks.model_checkpoint.every_n_train_steps={half}",
        "callbacks.model_checkpoint.filename='step{step}'",
        "callbacks.last_checkpoint=null",
    ]
    per_device = args.global_batch // devices
    single = ["trainer=cpu" if args.cpu else "trainer=gpu", f"data.batch_size={args.global_batch}"]
    parallel = {"ddp": ["trainer=ddp_sim"] if args.cpu else ["trainer=ddp", f"trainer.devices={devices}"]}
    if not args.cpu and not args.no_fsdp:
        parallel["fsdp"] = ["trainer=fsdp", f"trainer.devices={devices}"]
    plan = {"single": single, **{k: v + [f"data.batch_size={per_device}"] for k, v in parallel.items()}}
    plan["resumed"] = plan["ddp"] + [f"ckpt_path={out / 'ddp' / 'checkpoints' / f'step{half}.ckpt'}"]

    def made(name: str) -> bool:
        return (out / name / "csv" / "metrics.csv").exists()

    wanted = [name for name in plan if not made(name)] if args.runs is None else [n for n in args.runs.split(",") if n]
    unknown = sorted(set(wanted) - set(plan))
    if unknown:
        parser.error(f"--runs: unknown run(s) {unknown}; this setup has {list(plan)}")
    runs, wall = {}, {}
    for name, overrides in plan.items():
        if name in wanted:
            print(f"[scaling] {name}: train.py {' '.join(overrides)}", flush=True)
            wall[name] = _train(common + overrides, out / name, out / f"{name}.log", args.timeout)
        if made(name):
            runs[name] = read_metrics(out / name)
    if "single" not in runs:
        print(f"[scaling] made {sorted(runs)}; the table needs the `single` run in {out} (--runs single)")
        return 0
    rows = summarize(runs, devices)
    for row in rows:
        row["wall_s"] = wall.get(row["run"])
    cols = [
        "run",
        "devices",
        "vs",
        "steps_compared",
        "max_abs_loss_diff",
        "median_abs_loss_diff",
        "final_loss",
        "last_tenth_mean_loss",
        "tokens_per_sec",
        "speedup",
        "efficiency",
        "peak_mem_gib",
        "wall_s",
    ]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    with open(out / "scaling.json", "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print(f"\nruns and scaling.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
