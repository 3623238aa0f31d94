"""`python -m hydralm.sample`: checkpoint / folder loading, prompts, tokenizer choice, and the command itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONF, FAST, ROOT, composed
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from hydralm import HydraConfig, HydraLM
from hydralm.data.tokenizer import byte_level_tokenizer, load_tokenizer
from hydralm.export import save_pretrained
from hydralm.sample import (
    decode_ids,
    encode_prompt,
    parse_prompt_ids,
    prompt_text,
    quote_text_overrides,
    resolve_tokenizer_path,
    sample,
    select_tokenizer,
    trained_on_synthetic_ids,
)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    """last.ckpt of a real 2-step train.py run on synthetic retrieval_qa (vocab 512)."""
    tmp = tmp_path_factory.mktemp("run")
    with composed(tmp, FAST + ["model.vocab_size=512", "trainer.max_steps=2", "test=false", "logger=csv"]) as cfg:
        from hydralm.training.pipeline import train

        train(cfg)
    return tmp / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """An exported byte-level model (vocab 259) with its tokenizer.json bundled."""
    tmp = tmp_path_factory.mktemp("text")
    byte_level_tokenizer().save(str(tmp / "bytes.json"))
    model = HydraLM(HydraConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, swa_every=2, swa_window=16))
    return Path(save_pretrained(model, tmp / "model", tokenizer_path=tmp / "bytes.json"))


def sample_config(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="sample", overrides=overrides)


def run_sample(args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "hydralm.sample", *args],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- pieces that need no generation ----------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["To be, or", "it's (a) [test] = 1, {2}", "back\\slash", "ends with \\", "quote\\'d", "null"]
)
def test_a_text_prompt_from_the_shell_is_taken_literally(text):
    args = quote_text_overrides([f"prompt={text}", "max_new_tokens=3"])
    assert args[1] == "max_new_tokens=3"
    expected = None if text == "null" else text
    assert sample_config(args).prompt == expected
    assert quote_text_overrides(["prompt='already quoted'"]) == ["prompt='already quoted'"]


def test_a_list_prompt_is_joined_back_with_its_commas():
    assert prompt_text(OmegaConf.create({"p": ["To be", "or"]}).p) == "To be, or"
    assert prompt_text("plain") == "plain"


def test_prompt_ids_parse_from_lists_and_text():
    assert parse_prompt_ids([1, 2, 3], vocab_size=10) == [1, 2, 3]
    assert parse_prompt_ids(OmegaConf.create({"p": [4, 5]}).p, vocab_size=10) == [4, 5]
    assert parse_prompt_ids("[7, 8]", vocab_size=10) == parse_prompt_ids("7,8", vocab_size=10) == [7, 8]
    assert parse_prompt_ids(3, vocab_size=10) == [3]
    with pytest.raises(ValueError, match=r"every id must be an integer in \[0, vocab_size=10\) \(got 10\)"):
        parse_prompt_ids([1, 10], vocab_size=10)
    with pytest.raises(ValueError, match="at least one prompt token"):
        parse_prompt_ids([], vocab_size=10)
    with pytest.raises(ValueError, match="expected a list of token ids"):
        parse_prompt_ids("one,two", vocab_size=10)


def test_tokenizer_choice_explicit_then_bundled_then_run_config_then_bytes(tmp_path, text_folder):
    assert resolve_tokenizer_path(str(text_folder), "/some/tok.json") == "/some/tok.json"
    assert resolve_tokenizer_path(str(text_folder)) == str(text_folder / "tokenizer.json")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    Path(ckpt).write_bytes(b"")
    assert resolve_tokenizer_path(ckpt) is None and not trained_on_synthetic_ids(ckpt)  # no run config: bytes
    (run / ".hydra").mkdir()
    run_cfg = {
        "paths": {"data_dir": "/data"},
        "data": {"_target_": "hydralm.data.TextDataModule", "tokenizer_path": "${paths.data_dir}/tok.json"},
    }
    OmegaConf.save(OmegaConf.create(run_cfg), run / ".hydra" / "config.yaml")
    assert resolve_tokenizer_path(ckpt) == "/data/tok.json"
    run_cfg["data"] = {"_target_": "hydralm.data.SyntheticDataModule", "task": "mqar"}
    OmegaConf.save(OmegaConf.create(run_cfg), run / ".hydra" / "config.yaml")
    assert resolve_tokenizer_path(ckpt) is None and trained_on_synthetic_ids(ckpt)


def test_text_round_trips_through_the_byte_tokenizer_and_bos_is_hidden():
    info = load_tokenizer(None)
    ids = encode_prompt("Grüß dich", info, add_bos=True)
    assert ids[0] == info.bos_id and decode_ids(ids + [info.eos_id], info) == "Grüß dich"
    assert encode_prompt("a", info, add_bos=False) == [3 + ord("a")]
    with pytest.raises(ValueError, match="empty"):
        encode_prompt("", info, add_bos=False)


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(text_folder):
    with pytest.raises(ValueError, match="tokenizer has 259 ids but the model's vocab_size is 64"):
        select_tokenizer(str(text_folder), None, vocab_size=64)


def test_config_and_loading_errors_are_one_clear_message(trained_ckpt, tmp_path):
    with pytest.raises(ValueError, match="exactly one of prompt"):
        sample(sample_config([f"ckpt={trained_ckpt}"]))
    with pytest.raises(ValueError, match="exactly one of prompt"):
        sample(sample_config([f"ckpt={trained_ckpt}", "prompt=hi", "prompt_ids=[1]"]))
    with pytest.raises(ValueError, match="ckpt=<path> is required"):
        sample(sample_config(["prompt=hi"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample(sample_config([f"ckpt={tmp_path / 'nope.ckpt'}", "prompt=hi"]))
    with pytest.raises(ValueError, match=r"vocab_size=512\) \(got 999\)"):
        sample(sample_config([f"ckpt={trained_ckpt}", "prompt_ids=[1,999]"]))


# -- generation ------------------------------------------------------------------------------------
def test_sampling_is_seeded_and_greedy_matches_generate(trained_ckpt):
    from hydralm.export import load_model
    from hydralm.generation import generate

    common = [f"ckpt={trained_ckpt}", "prompt_ids=[1,5,9,200]", "max_new_tokens=6"]
    greedy = json.loads(sample(sample_config(common + ["temperature=0"])))
    expected = generate(load_model(trained_ckpt), torch.tensor([[1, 5, 9, 200]]), max_new_tokens=6, temperature=0)
    assert greedy == expected[0].tolist() and len(greedy) == 10
    seeded = [sample(sample_config(common + ["seed=3", "temperature=1.0", "top_k=null"])) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_command_samples_ids_from_a_lightning_checkpoint(trained_ckpt):
    overrides = [f"ckpt={trained_ckpt}", "prompt_ids=[1,2,3]", "max_new_tokens=5", "seed=7"]
    result = run_sample(overrides)
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout.strip().splitlines()[-1])
    assert ids[:3] == [1, 2, 3] and len(ids) == 8 and all(0 <= i < 512 for i in ids)
    assert ids == json.loads(sample(sample_config(overrides)))  # same seed, same sample as in-process
    assert "5 new tokens after a 3-token prompt" in result.stderr


def test_command_samples_text_from_an_exported_folder(text_folder):
    # What the shell passes for prompt="To be, or": Hydra alone refuses it ("Ambiguous value", the comma).
    result = run_sample([f"ckpt={text_folder}", "prompt=To be, or", "max_new_tokens=12", "temperature=0"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("To be, or") and len(result.stdout.rstrip("\n")) > len("To be, or")
    assert not os.path.exists(ROOT / ".hydra")  # sampling writes no Hydra run files


def test_command_reports_a_bad_checkpoint_without_a_traceback(tmp_path):
    result = run_sample([f"ckpt={tmp_path / 'missing.ckpt'}", "prompt_ids=[1]"])
    assert result.returncode == 2
    assert "error:" in result.stderr and "does not exist" in result.stderr and "Traceback" not in result.stderr
