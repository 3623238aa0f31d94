"""FSDP pieces that can be checked without a GPU (Lightning and torch run FSDP on CUDA only; the 2-GPU run
is `python -m benchmarks.scaling`, docs/distributed.md)."""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from hydralm.model import Block
from hydralm.training.optim import build_optimizer
from hydralm.training.strategies import fsdp_strategy

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")


def test_trainer_fsdp_config_wraps_each_block_and_can_checkpoint_activations():
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"])
    strategy = instantiate(cfg.trainer.strategy)
    policy = strategy.kwargs["auto_wrap_policy"]  # Lightning turns the class set into a ModuleWrapPolicy
    assert Block in policy._module_classes and strategy.kwargs["use_orig_params"]
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert Block in checkpointed._module_classes


def test_fsdp_strategy_names_a_class_path_that_does_not_import():
    with pytest.raises(ValueError, match=r"trainer.strategy.wrap: 'hydralm.model.Blok'"):
        fsdp_strategy(wrap=["hydralm.model.Blok"])


class _Sharded(nn.Module):
    """What the optimizer sees under FSDP (use_orig_params): wrapper prefixes in names, flat 1-D shards."""

    def __init__(self):
        super().__init__()
        self._fsdp_wrapped_module = nn.Module()
        self._fsdp_wrapped_module.proj = nn.Linear(4, 4)
        with torch.no_grad():
            self._fsdp_wrapped_module.proj.weight = nn.Parameter(torch.zeros(8))  # a shard of the 4x4 matrix
            self._fsdp_wrapped_module.proj.bias = nn.Parameter(torch.zeros(2))


def test_weight_decay_groups_follow_the_shapes_before_sharding():
    model = _Sharded()
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, sharded_ndims={"proj.weight": 2, "proj.bias": 1})
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([8])] and decay["weight_decay"] == 0.1
    assert [p.shape for p in no_decay["params"]] == [torch.Size([2])] and no_decay["weight_decay"] == 0.0


def test_muon_is_refused_on_sharded_parameters_with_the_way_out():
    with pytest.raises(ValueError, match="optimizer.name=muon.*trainer=fsdp"):
        build_optimizer(_Sharded(), "muon", lr=1e-3, weight_decay=0.1, sharded_ndims={"proj.weight": 2, "proj.bias": 1})
