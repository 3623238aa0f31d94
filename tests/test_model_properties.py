"""Model-level properties: parameter budget of the MTP head, tied head, init, and learning per layer type."""

import pytest
import torch
import torch.nn.functional as F

from hydralm import DenseTransformer, HydraConfig, HydraLM


def _param_count(cfg):
    with torch.device("meta"):
        return HydraLM(cfg).num_parameters()


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_head_adds_under_one_percent_at_160m(depth):
    base = _param_count(HydraConfig.from_preset("160m"))
    with_mtp = _param_count(HydraConfig.from_preset("160m", mtp_depth=depth))
    assert 0 < (with_mtp - base) / base < 0.01


def test_head_is_tied_and_counted_once():
    cfg = HydraConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2)
    model = HydraLM(cfg)
    assert model.lm_head.weight is model.embed.weight
    untied = HydraLM(cfg.replace(tie_embeddings=False))
    assert untied.num_parameters() - model.num_parameters() == 50 * 16


def test_residual_projections_get_scaled_init():
    cfg = HydraConfig(vocab_size=50, d_model=256, n_layers=8, n_heads=4, initializer_range=0.02)
    block = HydraLM(cfg).blocks[0]
    assert abs(block.mixer.in_proj.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.down.weight.std().item() - 0.02 / 4) < 0.001  # 1 / sqrt(2 * 8)


@pytest.mark.parametrize("layer_type", ["deltanet", "swa", "retrieval", "attention"])
def test_overfits_a_batch_for_every_layer_type(layer_type):
    torch.manual_seed(0)
    cfg = HydraConfig(
        vocab_size=64,
        d_model=48,
        n_layers=2,
        n_heads=4,
        layer_types=[layer_type] * 2,
        dn_chunk_size=16,
        swa_window=16,
        retrieval_chunk_size=8,
        retrieval_top_k=2,
        mtp_depth=1,
    )
    model = HydraLM(cfg)
    ids = torch.randint(0, 64, (4, 48))
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = model(ids, compute_mtp=True)
        loss = F.cross_entropy(out["logits"].flatten(0, 1), labels.flatten(), ignore_index=-100)
        (loss + out["mtp_aux_loss"]).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"{layer_type}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_dense_baseline_has_the_same_interface_and_size_class():
    cfg = HydraConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4)
    dense = DenseTransformer(cfg)
    assert dense.cfg.layer_types == ["attention"] * 3
    out = dense(torch.randint(0, 64, (2, 9)), return_state=True)
    assert out["logits"].shape == (2, 9, 64) and len(out["state"]) == 3
