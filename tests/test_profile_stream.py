"""The streaming-prefill profiler runs end to end (on CPU here; the figures it is for come from a GPU)."""

from benchmarks import profile_stream


def test_profile_stream_prints_the_share_of_each_layer_type(capsys):
    profile_stream.main("tiny", context=1024, chunk=256)
    out = capsys.readouterr().out
    assert "tokens 768:" in out
    for kind in ("deltanet", "swa", "retrieval"):
        assert f"| {kind} |" in out
