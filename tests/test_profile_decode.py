"""The decode profiler runs end to end (on CPU here; the figures it is for are host time per token)."""

import pytest
import torch

from benchmarks import profile_decode


def test_profile_decode_counts_calls_per_layer_part_and_prices_a_short_forward_in_steps(capsys):
    profile_decode.main("tiny", context=512, d_model=0)
    out = capsys.readouterr().out
    assert (
        "ms per step" in out
        and "StaticDecoder:" in out
        and "stateful forward over 3 token(s)" in out
        and "aten calls per token" in out
    )
    for part in ("deltanet mixer step", "swa mixer step", "retrieval mixer step", "mlp", "rmsnorm"):
        assert f"| {part} |" in out


@pytest.mark.slow  # three inductor compilations of a decode step, ~4 min on 2 cores
def test_the_folds_and_the_split_retrieval_kernel_leave_fewer_kernels_in_the_compiled_step(monkeypatch):
    """What HYDRALM_DECODE_LINEAR=fused and HYDRALM_RETRIEVAL_DECODE=triton are for: fewer kernels a decode step
    (inductor's C++ kernels here; a GPU's CUDA graph is the benchmark's to count)."""
    counts = {}
    for linear, retrieval in (("gemv", "torch"), ("fused", "torch"), ("fused", "triton")):
        monkeypatch.setenv("HYDRALM_DECODE_LINEAR", linear)
        monkeypatch.setenv("HYDRALM_RETRIEVAL_DECODE", retrieval)
        torch._dynamo.reset()
        counts[linear, retrieval] = profile_decode.count_compiled_kernels("tiny", context=256, d_model=0)
    assert counts["gemv", "torch"] > counts["fused", "torch"] > counts["fused", "triton"]
