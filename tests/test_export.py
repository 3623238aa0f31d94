"""Export to config.json + model.safetensors and back: exact round trips, Lightning checkpoints, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import FAST, ROOT, composed
from safetensors import safe_open

from hydralm import DenseTransformer, HydraConfig, HydraLM
from hydralm.export import (
    export_checkpoint,
    load_from_lightning_checkpoint,
    load_model,
    load_pretrained,
    save_pretrained,
)

SMALL = dict(
    vocab_size=64,
    d_model=32,
    n_layers=4,
    n_heads=2,
    swa_every=4,
    retrieval_every=3,
    swa_window=8,
    retrieval_chunk_size=4,
    retrieval_top_k=2,
    dn_chunk_size=8,
)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """last.ckpt of a real 2-step train.py run (MTP on)."""
    tmp = tmp_path_factory.mktemp("run")
    with composed(tmp, FAST + ["trainer.max_steps=2", "test=false", "model.mtp_depth=1", "logger=csv"]) as cfg:
        from hydralm.training.pipeline import train

        train(cfg)
    return tmp / "checkpoints" / "last.ckpt"


def _assert_same_model(a: HydraLM, b: HydraLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    ids = torch.randint(0, a.cfg.vocab_size, (2, 21))
    with torch.no_grad():
        out_a, out_b = a.eval()(ids, compute_mtp=a.mtp is not None), b.eval()(ids, compute_mtp=b.mtp is not None)
    assert torch.equal(out_a["logits"], out_b["logits"])
    for la, lb in zip(out_a["mtp_logits"] or [], out_b["mtp_logits"] or []):
        assert torch.equal(la, lb)


@pytest.mark.parametrize(
    "cls, fields",
    [(HydraLM, dict(mtp_depth=2)), (DenseTransformer, {}), (HydraLM, dict(tie_embeddings=False))],
    ids=["hydra-mtp", "dense", "hydra-untied"],
)
def test_save_then_load_is_exact(tmp_path, cls, fields):
    model = cls(HydraConfig(**SMALL, **fields))
    save_pretrained(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == ("dense" if cls is DenseTransformer else "hydra")
    assert {k: v for k, v in config.items() if k != "architecture"} == model.cfg.to_dict()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert ("lm_head.weight" in stored) == (not model.cfg.tie_embeddings)  # a tied head is stored once
    loaded = load_pretrained(tmp_path / "out")
    assert type(loaded) is cls and not loaded.training
    assert (loaded.lm_head.weight is loaded.embed.weight) == model.cfg.tie_embeddings
    _assert_same_model(model, loaded)


def test_low_precision_weights_keep_their_dtype(tmp_path):
    model = HydraLM(HydraConfig(**SMALL)).to(torch.bfloat16)
    loaded = load_pretrained(save_pretrained(model, tmp_path))
    assert loaded.embed.weight.dtype == torch.bfloat16
    _assert_same_model(model, loaded)


def test_lightning_checkpoint_loads_and_exports_exactly(trained_ckpt, tmp_path):
    checkpoint = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    model = load_from_lightning_checkpoint(trained_ckpt)
    assert model.cfg == HydraConfig(**checkpoint["hyper_parameters"]["model"]) and model.cfg.mtp_depth == 1
    trained = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(model.embed.weight, HydraLM(model.cfg).embed.weight)  # the trained weights, not an init

    folder = export_checkpoint(trained_ckpt, tmp_path / "exported")
    _assert_same_model(model, load_pretrained(folder))
    _assert_same_model(model, load_model(folder))
    _assert_same_model(model, load_model(trained_ckpt))


def test_dense_architecture_is_read_from_the_checkpoint(tmp_path):
    dense = DenseTransformer(HydraConfig(**SMALL))
    fake = {
        "hyper_parameters": {"model": HydraConfig(**SMALL).to_dict(), "architecture": "dense"},
        "state_dict": {f"net.{k}": v for k, v in dense.state_dict().items()},
        "global_step": 3,
    }
    torch.save(fake, tmp_path / "dense.ckpt")
    loaded = load_from_lightning_checkpoint(tmp_path / "dense.ckpt")
    assert type(loaded) is DenseTransformer
    _assert_same_model(dense, loaded)


def test_export_command_line(trained_ckpt, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "hydralm.export", "--ckpt", str(trained_ckpt), "--out", str(out)],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "exported hydra model HydraConfig(" in result.stdout
    assert "RuntimeWarning" not in result.stderr, result.stderr  # hydralm/__init__ must not import hydralm.export
    _assert_same_model(load_from_lightning_checkpoint(trained_ckpt), load_pretrained(out))
    missing = subprocess.run(
        [sys.executable, "-m", "hydralm.export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(out)],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "nope.ckpt' does not exist" in missing.stderr


# -- errors ----------------------------------------------------------------------------------------
def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_pretrained(tmp_path / "empty")
    folder = save_pretrained(HydraLM(HydraConfig(**SMALL)), tmp_path / "ok")
    config_path = os.path.join(folder, "config.json")
    config = json.loads(open(config_path).read())

    def write_config(data):
        with open(config_path, "w") as f:
            json.dump(data, f)

    write_config({**config, "d_modle": 32})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['d_modle'\]"):
        load_pretrained(folder)
    write_config({**config, "architecture": "mamba"})
    with pytest.raises(ValueError, match="architecture='mamba' is unknown"):
        load_pretrained(folder)
    write_config({**config, "d_model": 64})  # the weights no longer fit the config
    with pytest.raises(ValueError, match="does not match config.json"):
        load_pretrained(folder)
    with open(config_path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(folder)
    write_config(config)
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "neither")


class NotAllowed:
    pass


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .* does not exist"):
        load_from_lightning_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a HydraLM Lightning checkpoint"):
        load_from_lightning_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "garbage.ckpt").write_bytes(b"this is not a checkpoint" * 20)
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_from_lightning_checkpoint(tmp_path / "garbage.ckpt")
    torch.save({"hyper_parameters": {"model": {}}, "state_dict": {}, "x": NotAllowed()}, tmp_path / "object.ckpt")
    with pytest.raises(ValueError, match=r"weights_only=True\) refuses to load"):
        load_from_lightning_checkpoint(tmp_path / "object.ckpt")
    bad_config = {"hyper_parameters": {"model": {**HydraConfig(**SMALL).to_dict(), "n_heads": 3}}, "state_dict": {}}
    torch.save(bad_config, tmp_path / "bad_config.ckpt")
    with pytest.raises(ValueError, match="not a valid HydraConfig: HydraConfig.n_heads=3"):
        load_from_lightning_checkpoint(tmp_path / "bad_config.ckpt")
    no_weights = {"hyper_parameters": {"model": HydraConfig(**SMALL).to_dict()}, "state_dict": {}}
    torch.save(no_weights, tmp_path / "no_weights.ckpt")
    with pytest.raises(ValueError, match="weights do not match its own config"):
        load_from_lightning_checkpoint(tmp_path / "no_weights.ckpt")


def test_save_pretrained_rejects_what_is_not_a_hydra_model(tmp_path):
    with pytest.raises(TypeError, match="expected a HydraLM or DenseTransformer, got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)


def test_a_tokenizer_is_bundled_only_when_it_exists(tmp_path):
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"fake": "tokenizer"}')
    folder = save_pretrained(HydraLM(HydraConfig(**SMALL)), tmp_path / "with", tokenizer_path=tokenizer)
    assert (tmp_path / "with" / "tokenizer.json").read_text() == tokenizer.read_text()
    with pytest.raises(FileNotFoundError, match="tokenizer_path=.* does not exist"):
        save_pretrained(HydraLM(HydraConfig(**SMALL)), tmp_path / "without", tokenizer_path=tmp_path / "nope.json")
    assert not (tmp_path / "without").exists() and os.path.isdir(folder)
