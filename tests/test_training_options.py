"""Training switches that must not change the numbers: activation checkpointing and regional compile."""

import pytest
import torch
import torch.nn.functional as F
from helpers import MIXED_GQA

from hydralm import HydraConfig, HydraLM
from hydralm.training.lit_module import HydraLMModule

CFG = HydraConfig(**MIXED_GQA, swa_window=16, mtp_depth=1, memory=dict(exact_window=16, compress_every=4, pool_size=8))


def _loss_and_grads(model: HydraLM, ids: torch.Tensor):
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, compute_mtp=model.mtp is not None, return_logits=False)
    loss = out["loss"] + sum(out[k] for k in ("mtp_aux_loss", "memory_aux_loss") if out[k] is not None)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = HydraLM(CFG).train()
    ids = torch.randint(0, 64, (2, 48))
    eager = _loss_and_grads(model, ids)
    model.activation_checkpointing = True
    checkpointed = _loss_and_grads(model, ids)
    _assert_same(checkpointed, eager, rtol=0, atol=0)  # the same ops on the same inputs: bit for bit
    again = _loss_and_grads(model, ids)  # a reconstruction loss left by backward's recompute is not reused
    _assert_same(again, eager, rtol=0, atol=0)


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_a_fraction_of_blocks_checkpointed_is_spread_over_the_depth_and_changes_nothing(fraction, monkeypatch):
    """activation_checkpointing=f checkpoints floor(f * n_layers) blocks spread evenly (a memory / speed trade-off
    between none and all), with the same loss and gradients bit for bit."""
    import hydralm.model

    cfg = CFG.replace(n_layers=8, layer_types=None)
    model = HydraLM(cfg).train()
    ids = torch.randint(0, 64, (2, 48))
    eager = _loss_and_grads(model, ids)
    checkpointed_blocks = []
    original = hydralm.model.checkpoint

    def counted(block, *args, **kwargs):
        checkpointed_blocks.append(next(i for i, b in enumerate(model.blocks) if b is block))
        return original(block, *args, **kwargs)

    monkeypatch.setattr(hydralm.model, "checkpoint", counted)
    model.activation_checkpointing = fraction
    checkpointed = _loss_and_grads(model, ids)
    _assert_same(checkpointed, eager, rtol=0, atol=0)
    expected = [i for i in range(8) if int((i + 1) * fraction) > int(i * fraction)]
    assert len(expected) == int(8 * fraction) and checkpointed_blocks[: len(expected)] == expected


def test_checkpointing_the_mlp_sublayers_changes_nothing_and_keeps_less():
    """activation_checkpointing=mlp: every block keeps its MLP sublayer's input only (norm, gate_up and the product
    run again in backward): the same loss and gradients bit for bit, fewer bytes kept for backward."""
    from helpers import stored_bytes

    model = HydraLM(CFG).train()
    ids = torch.randint(0, 64, (2, 48))
    eager = _loss_and_grads(model, ids)
    kept = {}
    for setting in (False, "mlp"):
        model.activation_checkpointing = setting
        kept[setting] = stored_bytes(lambda: model(ids, labels=ids, return_logits=False)["loss"])
    _assert_same(_loss_and_grads(model, ids), eager, rtol=0, atol=0)
    hidden = model.blocks[0].mlp.down.weight.shape[1]
    assert kept[False] - kept["mlp"] >= 2 * 48 * hidden * 4 * len(model.blocks)  # gate_up, fp32, per block


def test_compiled_blocks_give_the_same_loss_and_gradients_aot_eager():
    """Dynamo capture of DeltaNet and SWA blocks (the graph break around the delta rule op included), without code
    generation. Retrieval blocks (CPU gather path: graph breaks at its data-dependent sizes) are in the slow test."""
    model = HydraLM(CFG.replace(memory=None, mtp_depth=0, n_layers=2, layer_types=["deltanet", "swa"])).train()
    ids = torch.randint(0, 64, (2, 24))
    eager = _loss_and_grads(model, ids)
    model.compile_blocks(backend="aot_eager")
    assert model.blocks_compiled
    _assert_same(_loss_and_grads(model, ids), eager, rtol=1e-5, atol=1e-6)
    assert all(not name.startswith("_orig_mod") for name in model.state_dict())


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients_inductor():
    model = HydraLM(CFG).train()
    ids = torch.randint(0, 64, (2, 48))
    eager = _loss_and_grads(model, ids)
    model.compile_blocks()
    _assert_same(_loss_and_grads(model, ids), eager, rtol=1e-4, atol=1e-5)


def test_module_switches_are_validated_and_auto_compile_stays_off_on_cpu():
    model, optimizer = CFG.to_dict(), dict(name="adamw", lr=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="compile='yes' is invalid"):
        HydraLMModule(model=model, optimizer=optimizer, compile="yes")
    for bad in (1, 1.5, "half", "MLP"):
        with pytest.raises(ValueError, match=f"activation_checkpointing={bad!r} is invalid"):
            HydraLMModule(model=model, optimizer=optimizer, activation_checkpointing=bad)
    module = HydraLMModule(model=model, optimizer=optimizer, compile="auto", activation_checkpointing=True)
    module.configure_model()
    assert module.net.activation_checkpointing and not module.net.blocks_compiled


def test_checkpoint_from_a_whole_model_compile_loads():
    """Before regional compile, compile=true saved each weight a second time under `_compiled_forward._orig_mod.`."""
    model, optimizer = CFG.to_dict(), dict(name="adamw", lr=1e-3, weight_decay=0.1)
    source = HydraLMModule(model=model, optimizer=optimizer)
    state = source.state_dict()
    state.update({f"_compiled_forward._orig_mod.{k[4:]}": v for k, v in state.items() if k.startswith("net.")})
    checkpoint = {"state_dict": state}
    target = HydraLMModule(model=model, optimizer=optimizer, compile=True)
    target.on_load_checkpoint(checkpoint)
    target.load_state_dict(checkpoint["state_dict"])
    for a, b in zip(target.net.parameters(), source.net.parameters()):
        assert torch.equal(a, b)
