"""The decode profiler runs end to end (on CPU here; the figures it is for are host time per token)."""

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
