"""The benchmark record (benchmarks/record.py): merging into results files, the fields of each figure, the
rendering into docs/benchmarks.md, and that the committed docs table is the current rendering."""

import json

import pytest

from benchmarks import record


@pytest.fixture
def provenance(monkeypatch):
    monkeypatch.setenv("HYDRALM_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("BENCH_COMMAND", "BENCH_MODELS=HydraLM-160m python -m benchmarks.speed models")
    monkeypatch.delenv("OUT", raising=False)


def test_write_merges_and_keeps_other_keys(tmp_path, provenance):
    path = tmp_path / "h200.json"
    first = record.Run()
    first.record("train_ktok_s/HydraLM-160m/16384", 67.1, "ktok/s", peer="train_ktok_s/Dense-160m/16384")
    first.record("train_ktok_s/Dense-160m/16384", 105.2, "ktok/s")
    assert first.write(path) == path

    second = record.Run()
    second.record("train_ktok_s/HydraLM-160m/16384", 80.0, "ktok/s", peer="train_ktok_s/Dense-160m/16384")
    second.record("layer_ms/retrieval/65536", 51.7, "ms", peer="layer_ms/swa/65536")
    second.write(path)

    data = json.loads(path.read_text())
    assert set(data) == {"train_ktok_s/HydraLM-160m/16384", "train_ktok_s/Dense-160m/16384", "layer_ms/retrieval/65536"}
    assert data["train_ktok_s/HydraLM-160m/16384"]["value"] == 80.0  # measured again: updated
    assert data["train_ktok_s/Dense-160m/16384"]["value"] == 105.2  # not measured again: kept
    for figure in data.values():
        assert set(figure) == set(record.FIELDS)
    hydra = data["train_ktok_s/HydraLM-160m/16384"]
    assert hydra["commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert hydra["command"] == "BENCH_MODELS=HydraLM-160m python -m benchmarks.speed models"
    assert hydra["peer"] == "train_ktok_s/Dense-160m/16384" and hydra["unit"] == "ktok/s"
    assert len(hydra["date"]) == 10 and hydra["date"][4] == "-" and hydra["torch"]
    assert data["train_ktok_s/Dense-160m/16384"]["peer"] is None


def test_write_copies_to_out_and_skips_empty_runs(tmp_path, provenance, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert record.Run().write(tmp_path / "h200.json") is None  # nothing measured: no file
    assert not (tmp_path / "h200.json").exists()
    run = record.Run()
    run.record("mtp_speedup/160m-k2", 1.8, "×")
    run.write(tmp_path / "h200.json")
    assert json.loads((tmp_path / "out" / "h200.json").read_text()) == json.loads((tmp_path / "h200.json").read_text())


def test_provenance_without_overrides(monkeypatch):
    monkeypatch.delenv("HYDRALM_COMMIT", raising=False)
    monkeypatch.delenv("BENCH_COMMAND", raising=False)
    for name in [k for k in record._LAUNCH_ENV if record._COMMAND_ENV.match(k)]:
        monkeypatch.delitem(record._LAUNCH_ENV, name)
    monkeypatch.setitem(record._LAUNCH_ENV, "BENCH_CONTEXTS", "4096")  # as if the process started with it
    monkeypatch.setenv("HYDRALM_NORM", "triton")  # set by a section for one row: not the run's command
    sha = record.commit()
    assert sha == "unknown" or len(sha.removesuffix("-dirty")) == 40  # git's HEAD when the tree has .git
    assert record.command_line().startswith("BENCH_CONTEXTS=4096 python ")
    assert "HYDRALM_NORM" not in record.command_line()


def test_bad_figures_are_refused_by_name():
    run = record.Run()
    with pytest.raises(ValueError, match="key 'train tok/s'"):
        run.record("train tok/s", 1.0, "ktok/s")
    with pytest.raises(ValueError, match="value nan must be a finite number"):
        run.record("layer_ms/swa/4096", float("nan"), "ms")
    with pytest.raises(ValueError, match="unit '' must be"):
        run.record("layer_ms/swa/4096", 4.9, "")
    with pytest.raises(ValueError, match="peer 'swa' must be"):
        run.record("layer_ms/retrieval/4096", 4.9, "ms", peer="swa")


def test_corrupt_results_file_is_named(tmp_path):
    (tmp_path / "h200.json").write_text("{not json")
    run = record.Run()
    run.record("layer_ms/swa/4096", 4.9, "ms")
    with pytest.raises(ValueError, match="h200.json: not valid JSON"):
        run.write(tmp_path / "h200.json")


def test_device_file_names():
    assert record.device_slug("NVIDIA H200") == "h200"
    assert record.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert record.device_slug("CPU (x86_64, 2 cores)") == "cpu"


def test_rendering(tmp_path, provenance):
    run = record.Run()
    run.record("layer_ms/retrieval/65536", 51.7, "ms", peer="layer_ms/swa/65536")
    run.record("layer_ms/swa/65536", 4.92, "ms")
    run.record("peak_gib/train-160m/16384x4", 38.0, "GiB")
    run.record("extra_ms/thing/1", 2.0, "ms")
    run.write(tmp_path / "h200.json")
    other = record.Run()
    other.record("layer_ms/swa/65536", 9.0, "ms")
    other.write(tmp_path / "a100-sxm4-80gb.json")

    text = record.render(tmp_path)
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| `")}
    retrieval = lines["`layer_ms/retrieval/65536`"]
    assert "| 51.7 ms | `layer_ms/swa/65536` | 4.92 ms | 10.51× | ≤ 1.5× peer | **not met** |" in retrieval
    assert "| `0123456` |" in retrieval and "`BENCH_MODELS=HydraLM-160m python -m benchmarks.speed models`" in retrieval
    assert (
        "| 38 GiB |" in lines["`peak_gib/train-160m/16384x4`"]
        and "| **met** |" in lines["`peak_gib/train-160m/16384x4`"]
    )
    assert "| not measured yet |" in lines["`mtp_speedup/160m-k2`"]  # a target without a figure
    assert "`extra_ms/thing/1`" in lines  # a figure without a target still shows
    assert "### `a100-sxm4-80gb.json`" in text and text.index("### `h200.json`") < text.index("a100")
    assert text.count("`layer_ms/retrieval/65536`") == 1  # the target's row is the recorded figure's row


def test_render_rewrites_only_the_marked_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{record.BEGIN}\nold table\n{record.END}\n\n## After\n")
    assert record.main(["render", "--check"], doc=doc, results_dir=tmp_path) == 1
    assert record.main(["render"], doc=doc, results_dir=tmp_path) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n") and text.endswith(f"{record.END}\n\n## After\n")
    assert "old table" not in text and "| `mtp_speedup/160m-k2` | not measured yet |" in text
    assert record.main(["render", "--check"], doc=doc, results_dir=tmp_path) == 0


def test_committed_docs_table_is_the_rendering():
    """docs/benchmarks.md shows exactly what benchmarks/results/*.json hold: after new figures land, run
    `python -m benchmarks.record render` and commit both."""
    text = record.DOC.read_text()
    assert record.replace_section(text, record.render()) == text
