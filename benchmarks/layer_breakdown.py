"""Where a training step's time and memory go, per layer type: `python -m benchmarks.layer_breakdown [options]`.

Times fwd+bwd (bf16 autocast, the trainer's loss: no full logits) of small models built from the 160m preset's
dimensions, one layer type each, and derives the per-layer costs by difference:

    deltanet x1, deltanet x2        ->  one DeltaNet layer + its MLP = t(x2) - t(x1)
                                        embedding + head + loss      = t(x1) - (t(x2) - t(x1))
    swa x2, retrieval x2            ->  one layer + its MLP          = (t(x2) - embedding + head + loss) / 2
    160m (the full 20-layer model)  ->  for reference, with its peak memory

Options: --shapes 16384x4,65536x1 (T x B per row, default), --full-logits (the loss through (B, T, V) fp32
logits, as the step was before the chunked loss), --compile (HydraLM.compile_blocks), --checkpoint
(activation checkpointing per block), --no-model (skip the 160m row). Peak memory is torch's
max_memory_allocated over the timed calls (weights and gradients included). Results also go to
$OUT/layer_breakdown.json when OUT is set. Importable without a GPU; running needs CUDA.
"""

import argparse
import json
import os
import statistics
import sys
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

VARIANTS = [("deltanet", 1), ("deltanet", 2), ("swa", 2), ("retrieval", 2)]


def time_ms(fn: Callable[[], None], warmup: int = 3, repeat: int = 10) -> float:
    """Median ms per call of `fn` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build(layer_type: Optional[str], n_layers: int, compile_blocks: bool, checkpoint: bool):
    """The 160m preset with `n_layers` layers of one type (None: the full preset), on CUDA."""
    from hydralm import HydraConfig, HydraLM

    if layer_type is None:
        cfg = HydraConfig.from_preset("160m")
    else:
        cfg = HydraConfig.from_preset("160m", n_layers=n_layers, layer_types=[layer_type] * n_layers)
    model = HydraLM(cfg).cuda().train()
    model.activation_checkpointing = checkpoint
    if compile_blocks:
        model.compile_blocks()
    return model


def fwd_bwd(model, ids: torch.Tensor, full_logits: bool) -> Callable[[], None]:
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if full_logits:
                logits = model(ids)["logits"]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            else:
                loss = model(ids, labels=labels, return_logits=False)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def measure(model, T: int, B: int, full_logits: bool) -> dict:
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        ms = time_ms(fwd_bwd(model, ids, full_logits))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": "OOM", "peak_GiB": "OOM"}
    return {"ms": ms, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}


def derived_rows(measured: dict, T: int, B: int) -> List[dict]:
    """Per-layer costs by difference (see the module docstring); rows whose inputs are missing are skipped."""
    t = {key: row["ms"] for key, row in measured.items() if isinstance(row["ms"], float)}
    rows = []
    if ("deltanet", 1) in t and ("deltanet", 2) in t:
        layer = t[("deltanet", 2)] - t[("deltanet", 1)]
        rest = t[("deltanet", 1)] - layer
        rows += [
            {"what": "deltanet layer + MLP", "T": T, "B": B, "ms": layer},
            {"what": "embedding + head + loss", "T": T, "B": B, "ms": rest},
        ]
        for kind in ("swa", "retrieval"):
            if (kind, 2) in t:
                rows.append({"what": f"{kind} layer + MLP", "T": T, "B": B, "ms": (t[(kind, 2)] - rest) / 2})
    return rows


def _record_layers(derived: List[dict], measured: dict, T: int) -> None:
    """layer_ms/<layer>/<T> and the 2-layer models' peak_gib/<layer>-x2/<T> into the benchmark record;
    retrieval's peer is the SWA layer (model) of the same run."""
    from benchmarks import record

    for row in derived:
        layer = row["what"].split(" ")[0]
        if row["what"].endswith("layer + MLP"):
            peer = f"layer_ms/swa/{row['T']}" if layer == "retrieval" else None
            record.record(f"layer_ms/{layer}/{row['T']}", row["ms"], "ms", peer=peer)
    for layer in ("swa", "retrieval"):
        peak = measured.get((layer, 2), {}).get("peak_GiB")
        if isinstance(peak, float):
            peer = f"peak_gib/swa-x2/{T}" if layer == "retrieval" else None
            record.record(f"peak_gib/{layer}-x2/{T}", peak, "GiB", peer=peer)
    record.write()


def _print_table(title: str, rows: list, cols: list) -> None:
    print(f"\n## {title}\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    for row in rows:
        cells = [f"{row.get(c):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layer_breakdown", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="16384x4,65536x1", help="T x B per measurement, comma separated")
    parser.add_argument("--full-logits", action="store_true", help="loss through (B, T, V) fp32 logits (old step)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (HydraLM.compile_blocks)")
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--no-model", action="store_true", help="skip the full 160m model row")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    torch.set_float32_matmul_precision("high")
    setup = {"full_logits": args.full_logits, "compile": args.compile, "checkpoint": args.checkpoint}
    print({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **setup}, flush=True)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",") if shape]
    variants = VARIANTS + ([(None, 20)] if not args.no_model else [])
    measured_rows, derived = [], []
    for T, B in shapes:
        measured = {}
        for layer_type, n_layers in variants:
            model = build(layer_type, n_layers, args.compile, args.checkpoint)
            measured[(layer_type, n_layers)] = measure(model, T, B, args.full_logits)
            name = f"{layer_type} x{n_layers}" if layer_type else "HydraLM-160m (20 layers)"
            measured_rows.append({"model": name, "T": T, "B": B, **measured[(layer_type, n_layers)]})
            print(measured_rows[-1], flush=True)
            del model
            torch.cuda.empty_cache()
        derived += derived_rows(measured, T, B)
        if not any(setup.values()):  # the default step is the one the record's layer_ms keys describe
            _record_layers(
                derived_rows(measured, T, B), measured, T
            )  # after each shape: a cut-off run keeps what it measured
    _print_table(f"fwd+bwd, bf16 autocast {setup}", measured_rows, ["model", "T", "B", "ms", "peak_GiB"])
    _print_table("per layer, by difference (ms)", derived, ["what", "T", "B", "ms"])
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], "layer_breakdown.json"), "w") as f:
            json.dump({"setup": setup, "measured": measured_rows, "derived": derived}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
