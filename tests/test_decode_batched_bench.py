"""benchmarks/speed.py decode_batched runs end to end on CPU with a tiny memory model (the GPU run is the H200's)."""

import pytest
import torch
from helpers import static_model

from benchmarks import record
from benchmarks.speed import decode_batched, decode_variant

pytestmark = pytest.mark.usefixtures("single_thread")


def test_decode_batched_records_every_figure(tmp_path):
    model = static_model(mtp_depth=2)
    run = record.Run()
    out = decode_batched(
        model,
        contexts=[40, 100],
        batches=[1, 3],
        kind="static",
        mtp_new_tokens=12,
        prompt=torch.randint(0, 64, (1, 9)),
        subject="tiny",
        run=run,
    )
    keys = {f"decode_tok_s/tiny-memory-bs{b}/{c}" for b in (1, 3) for c in (40, 100)}
    keys |= {
        "mtp_speedup/tiny-k2",
        "streaming_prefill_ktok_s/tiny-memory/40",
        "streaming_prefill_ktok_s/tiny-memory/100",
    }
    assert set(run.figures) == keys
    assert all(figure["value"] > 0 for figure in run.figures.values())
    assert out["mtp"]["identical_to_generate"] and 0 <= out["mtp"]["acceptance"] <= 1
    assert run.write(tmp_path / "cpu.json").exists()


def test_an_opt_in_decode_path_records_under_keys_of_its_own(monkeypatch):
    """HYDRALM_DECODE_LINEAR=fused / HYDRALM_RETRIEVAL_DECODE=triton figures sit beside the default's, not over them
    (decode_batched puts the suffix into its decode_tok_s and mtp_speedup keys)."""
    assert decode_variant() == ""
    monkeypatch.setenv("HYDRALM_DECODE_LINEAR", "fused")
    assert decode_variant() == "-folded"
    monkeypatch.setenv("HYDRALM_RETRIEVAL_DECODE", "triton")
    assert decode_variant() == "-folded-retrieval-kernel"
