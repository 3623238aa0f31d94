"""HydraConfig: the layer schedule, validation messages, serialisation and presets."""

import json

import pytest
from omegaconf import OmegaConf

from hydralm import PRESETS, HydraConfig


def test_default_config_keeps_0_2_0_semantics():
    cfg = HydraConfig()
    assert cfg.retrieval_every == 0 and cfg.mtp_depth == 0 and cfg.memory is None
    assert "retrieval" not in cfg.layer_types
    assert cfg.layer_types == ["deltanet", "deltanet", "deltanet", "swa"] * 3


def test_default_20_layer_schedule_has_10_deltanet_5_swa_5_retrieval():
    cfg = HydraConfig(n_layers=20, swa_every=4, retrieval_every=3)
    counts = {t: cfg.layer_types.count(t) for t in set(cfg.layer_types)}
    assert counts == {"deltanet": 10, "swa": 5, "retrieval": 5}
    assert cfg.layer_types[2] == "retrieval" and cfg.layer_types[3] == "swa" and cfg.layer_types[11] == "swa"
    assert HydraConfig.from_preset("160m").layer_types == cfg.layer_types


def test_explicit_layer_types_override_the_rule():
    cfg = HydraConfig(n_layers=3, layer_types=["swa", "retrieval", "deltanet"], retrieval_every=0)
    assert cfg.layer_types == ["swa", "retrieval", "deltanet"]


BAD_VALUES = [
    ("vocab_size", 1),
    ("d_model", 0),
    ("n_layers", -2),
    ("n_heads", 0),
    ("n_heads", 5),
    ("head_dim", 0),
    ("n_kv_heads", 5),
    ("mlp_mult", 0.0),
    ("mlp_multiple_of", 0),
    ("dn_short_conv_kernel", 0),
    ("dn_use_gate", "yes"),
    ("dn_chunk_size", 0),
    ("dn_norm_qk", 1),
    ("swa_window", 0),
    ("swa_every", -1),
    ("rope_base", 0.0),
    ("retrieval_every", -1),
    ("retrieval_top_k", 0),
    ("retrieval_chunk_size", 0),
    ("mtp_depth", -1),
    ("mtp_loss_weight", -0.1),
    ("tie_embeddings", None),
    ("rms_eps", 0.0),
    ("initializer_range", -1.0),
    ("layer_types", ["deltanet"] * 3),
    ("layer_types", ["mamba"] * 12),
    ("layer_types", "deltanet"),
    ("memory", {"exact_window": 8}),
    ("memory", {"exact_window": 8, "compress_every": 0, "pool_size": 4}),
    ("memory", 5),
    ("n_layers", 2.0),
    ("d_model", True),
    ("mlp_mult", float("nan")),
    ("head_dim", 7),
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_each_invalid_field_raises_one_value_error_naming_it(field, value):
    with pytest.raises(ValueError) as err:
        HydraConfig(**{field: value})
    message = str(err.value)
    assert field in message and "expected" in message


def test_round_trip_through_json_preserves_config_and_computed_schedule():
    cfg = HydraConfig(
        n_layers=8,
        retrieval_every=3,
        mtp_depth=2,
        n_kv_heads=4,
        memory={"exact_window": 64, "compress_every": 16, "pool_size": 32},
    )
    data = json.loads(cfg.to_json())
    assert data["layer_types"] is None  # computed schedules stay computed
    again = HydraConfig.from_dict(data)
    assert again == cfg
    # a replace() recomputes the schedule instead of keeping a stale list
    assert cfg.replace(n_layers=4).layer_types == ["deltanet", "deltanet", "retrieval", "swa"]
    explicit = HydraConfig(n_layers=2, layer_types=["swa", "swa"])
    assert HydraConfig.from_dict(explicit.to_dict()).layer_types == ["swa", "swa"]


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field"):
        HydraConfig.from_dict({"d_modle": 5})


def test_summary_is_one_line():
    text = HydraConfig.from_preset("160m", mtp_depth=2).summary()
    assert "\n" not in text and "10 deltanet" in text and "5 retrieval" in text and "mtp_depth=2" in text


def test_presets_are_valid_and_unknown_preset_errors():
    for name in PRESETS:
        HydraConfig.from_preset(name)
    big = HydraConfig.from_preset("160m")
    assert (big.d_model, big.n_layers, big.n_heads) == (768, 20, 12)
    with pytest.raises(ValueError, match="preset='huge' is unknown"):
        HydraConfig.from_preset("huge")


def test_model_yaml_files_are_the_presets(tmp_path):
    """conf/model/*.yaml are generated from hydralm/presets.py: a preset or a default changed without
    regenerating them (`python -m hydralm.presets conf/model`) fails here."""
    import pathlib

    from hydralm.presets import render_yaml

    conf = pathlib.Path(__file__).resolve().parents[1] / "conf" / "model"
    assert sorted(p.stem for p in conf.glob("*.yaml")) == sorted(PRESETS)
    for name in PRESETS:
        assert (conf / f"{name}.yaml").read_text() == render_yaml(name), f"conf/model/{name}.yaml is stale"
        data = OmegaConf.to_container(OmegaConf.load(conf / f"{name}.yaml"))
        assert HydraConfig(**data) == HydraConfig.from_preset(name)
