"""generate(decoder=...): a StaticDecoder (eager or compiled) gives model.step's tokens, is chosen by "auto"
only where a CUDA graph pays, refuses unsupported models, and is cached on the model outside its state_dict."""

import copy

import pytest
import torch
from helpers import CONF
from helpers import static_model as small
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from hydralm.generation import GRAPH_MIN_NEW_TOKENS, _pick_decoder, generate
from hydralm.sample import generate_ids

pytestmark = pytest.mark.usefixtures("single_thread")


def test_static_decoding_gives_the_step_tokens_with_eos_and_ragged_prompts():
    model = small()
    prompt = torch.randint(0, 64, (3, 21))
    free = generate(model, prompt, 40, temperature=0, decoder="step")
    assert torch.equal(generate(model, prompt, 40, temperature=0, decoder="static"), free)
    eos = int(free[1, 21 + 5])  # row 1 finishes early; rows that go on are fed eos by the static decoder
    for kwargs in (dict(eos_token_id=eos), dict(eos_token_id=eos, pad_token_id=-1)):  # -1: never fed
        step = generate(model, prompt, 40, temperature=0, decoder="step", **kwargs)
        assert torch.equal(generate(model, prompt, 40, temperature=0, decoder="static", **kwargs), step)
    rows = [prompt[0, :5], prompt[1], prompt[2, :5], prompt[0, :12]]  # length groups of 2, 1 and 1 rows
    padded = torch.zeros(4, 21, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : r.numel()] = r
    lengths = [r.numel() for r in rows]
    step = generate(model, rows, 40, temperature=0, eos_token_id=eos, decoder="step")
    for static in (
        generate(model, rows, 40, temperature=0, eos_token_id=eos, decoder="static"),
        generate(model, padded, 40, temperature=0, eos_token_id=eos, prompt_lengths=lengths, decoder="static"),
    ):
        assert all(torch.equal(a, b) for a, b in zip(static, step))
    # sampling without eos: the same batch at every step, so the same random draws
    seeded = dict(temperature=1.0, generator=torch.Generator().manual_seed(3))
    sampled = generate(model, prompt, 20, decoder="step", **seeded)
    seeded["generator"].manual_seed(3)
    assert torch.equal(generate(model, prompt, 20, decoder="static", **seeded), sampled)


def test_decoders_are_cached_on_the_model_outside_its_state_dict():
    model = small()
    keys = set(model.state_dict())
    generate(model, torch.randint(0, 64, (2, 9)), 5, temperature=0, decoder="static")
    cached = dict(model._static_decoders)
    generate(model, torch.randint(0, 64, (2, 30)), 5, temperature=0, decoder="static")  # loaded, not rebuilt
    generate(model, torch.randint(0, 64, (1, 4)), 1, decoder="static")  # one token: no step, no decoder
    assert len(cached) == 1 and dict(model._static_decoders) == cached
    assert all(a is b for a, b in zip(cached.values(), model._static_decoders.values()))
    assert set(model.state_dict()) == keys
    assert not copy.deepcopy(model)._static_decoders  # a copy's decoders would write the original's buffers


def test_auto_picks_a_graph_only_on_cuda_for_supported_models_and_long_outputs():
    model, cuda = small(), torch.device("cuda")
    assert _pick_decoder(model, "auto", GRAPH_MIN_NEW_TOKENS, cuda) == "graph"
    assert _pick_decoder(model, "auto", GRAPH_MIN_NEW_TOKENS - 1, cuda) == "step"
    assert _pick_decoder(model, "auto", 10_000, torch.device("cpu")) == "step"
    assert _pick_decoder(small(layer_types=("swa", "attention")), "auto", 10_000, cuda) == "step"
    assert _pick_decoder(small(memory=None), "auto", 10_000, cuda) == "step"
    generate(model, torch.randint(0, 64, (1, 4)), 8)  # CPU: model.step, nothing cached
    assert not hasattr(model, "_static_decoders")
    model._static_decoders = {(1, "graph", "cuda", torch.bfloat16): None}  # a compiled decoder exists: reuse pays
    assert _pick_decoder(model, "auto", 2, cuda) == "graph"
    assert _pick_decoder(model, "auto", 1, cuda) == "step"  # one new token needs no step


def test_bad_decoder_values_and_unsupported_models_raise():
    prompt = torch.randint(0, 64, (1, 4))
    for bad in ("cuda_graph", None, 1):
        with pytest.raises(ValueError, match=r"decoder must be one of \('auto', 'step', 'static', 'graph'\)"):
            generate(small(), prompt, 3, decoder=bad)
    with pytest.raises(ValueError, match=r"decoder='static': .*\['attention'\]"):
        generate(small(layer_types=("deltanet", "attention")), prompt, 3, decoder="static")
    with pytest.raises(ValueError, match="decoder='graph': .*HydraConfig.memory"):
        generate(small(memory=None), prompt, 3, decoder="graph")
    assert generate(small(layer_types=("attention",)), prompt, 3, decoder="step").shape == (1, 7)


def test_the_sample_command_passes_decoder_on():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="sample", overrides=["temperature=0", "max_new_tokens=12"])
    GlobalHydra.instance().clear()
    model, prompt = small(), [3, 1, 4, 1, 5]
    assert cfg.decoder == "auto"
    expected = generate_ids(model, prompt, cfg, None)
    cfg.decoder = "static"
    assert generate_ids(model, prompt, cfg, None) == expected and model._static_decoders
    cfg.decoder = "fast"
    with pytest.raises(ValueError, match="decoder must be one of"):
        generate_ids(model, prompt, cfg, None)


@pytest.mark.slow
def test_compiled_decoder_gives_the_step_tokens_and_is_reused():
    model = small()
    prompt = torch.randint(0, 64, (2, 21))
    step = generate(model, prompt, 40, temperature=0, decoder="step")
    assert torch.equal(generate(model, prompt, 40, temperature=0, decoder="graph"), step)
    decoder = next(iter(model._static_decoders.values()))
    other = torch.randint(0, 64, (2, 13))
    assert torch.equal(
        generate(model, other, 30, temperature=0, decoder="graph"),
        generate(model, other, 30, temperature=0, decoder="step"),
    )
    assert list(model._static_decoders.values()) == [decoder]
