"""benchmarks/layer_breakdown.py imports without a GPU and derives per-layer costs by difference."""

from benchmarks.layer_breakdown import derived_rows, main


def test_per_layer_costs_fall_out_by_difference():
    measured = {("deltanet", 1): {"ms": 10.0}, ("deltanet", 2): {"ms": 14.0}, ("swa", 2): {"ms": 12.0}}
    measured[("retrieval", 2)] = {"ms": "OOM"}  # a failed row is left out, not subtracted
    rows = {row["what"]: row["ms"] for row in derived_rows(measured, 16384, 4)}
    assert rows == {"deltanet layer + MLP": 4.0, "embedding + head + loss": 6.0, "swa layer + MLP": 3.0}


def test_without_a_gpu_it_says_so_and_exits_nonzero(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert main(["--shapes", "64x1"]) == 1
    assert "no CUDA device" in capsys.readouterr().out
