"""The training loss without full logits gives the loss and gradients of the full-logits step it replaced."""

import pytest
import torch
import torch.nn.functional as F
from helpers import MIXED_GQA

from hydralm.modules.mtp_head import mtp_loss
from hydralm.training.lit_module import HydraLMModule

MODEL = dict(MIXED_GQA, swa_window=16, mtp_depth=2, memory=dict(exact_window=16, compress_every=4, pool_size=8))
OPTIMIZER = dict(name="adamw", lr=1e-3, weight_decay=0.1)


def _batch(B=2, N=48, V=64):
    ids = torch.randint(0, V, (B, N))
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    labels[0, :10] = -100  # a prompt with no loss
    positions = torch.stack([torch.randperm(N - 1)[:3] for _ in range(B)])
    return {"input_ids": ids, "labels": labels, "query_positions": positions}


def _old_step_loss(net, batch):
    """The step as it was: (B, N, V) fp32 logits and F.cross_entropy, MTP CE from the MTP logits."""
    out = net(batch["input_ids"], compute_mtp=True, labels=batch["labels"])
    ce = F.cross_entropy(out["logits"].flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
    return ce + net.cfg.mtp_loss_weight * mtp_loss(out["mtp_logits"], batch["labels"]) + out["memory_aux_loss"]


def _grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def module_and_batch():
    torch.manual_seed(0)
    return HydraLMModule(model=MODEL, optimizer=OPTIMIZER), _batch()


def test_training_step_loss_and_gradients_match_the_full_logits_step(module_and_batch):
    module, batch = module_and_batch
    old_loss = _old_step_loss(module.net, batch)
    old = _grads(module, old_loss)
    new_loss, _ = module._shared_step(batch, "train")
    new = _grads(module, new_loss)
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-5, atol=1e-6)
    assert old.keys() == new.keys() and any(name.startswith("net.mtp.") for name in new)
    for name in old:
        torch.testing.assert_close(new[name], old[name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_without_logits_equals_loss_from_logits_and_logits_at_are_the_full_rows(module_and_batch):
    module, batch = module_and_batch
    net = module.net.eval()
    try:
        with torch.no_grad():
            full = net(batch["input_ids"], labels=batch["labels"], compute_mtp=True)
            lean = net(
                batch["input_ids"],
                labels=batch["labels"],
                compute_mtp=True,
                return_logits=False,
                logits_at=batch["query_positions"],
            )
    finally:
        net.train()
    assert lean["logits"] is None and lean["mtp_logits"] is None
    torch.testing.assert_close(lean["loss"], full["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean["mtp_aux_loss"], full["mtp_aux_loss"], rtol=1e-5, atol=1e-6)
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(lean["logits_at"], full["logits"][rows, batch["query_positions"]])


def test_bad_labels_and_positions_are_named(module_and_batch):
    net = module_and_batch[0].net
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        net(ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="logits_at must be"):
        net(ids, logits_at=torch.zeros(3, 1, dtype=torch.long))
