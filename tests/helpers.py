"""Shared test helpers: compose the real Hydra configs into a temporary run directory."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig as HydraRuntime
from omegaconf import open_dict

from hydralm.modules.registry import LAYER_TYPES
from hydralm.training.run_dirs import register_resolver

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# Small, fast settings for CPU tests: a 2-layer model on 128-token retrieval_qa.
FAST = [
    "model.d_model=32",
    "model.n_layers=3",
    "model.n_heads=2",
    "model.swa_window=16",
    "model.retrieval_chunk_size=8",
    "model.retrieval_top_k=2",
    "model.dn_chunk_size=16",
    "data.task_kwargs.seq_len=128",
    "data.task_kwargs.num_facts=4",
    "data.task_kwargs.num_queries=2",
    "data.batch_size=4",
    "data.num_val_samples=8",
    "data.num_test_samples=8",
    "data.curriculum=null",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "print_config=false",
]


@contextmanager
def composed(tmp_path: Path, overrides: List[str], config_name: str = "train"):
    """The config `python train.py <overrides>` would run, with every output under tmp_path."""
    register_resolver()  # as train.py does
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=config_name, return_hydra_config=True, overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            cfg.paths.log_dir = str(tmp_path)
            cfg.paths.root_dir = str(ROOT)
            cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraRuntime.instance().set_config(cfg)
        try:
            yield cfg
        finally:
            GlobalHydra.instance().clear()


def run_script(args: List[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <args>` from the project root the way a user does; outputs land in cwd's logs/."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PROJECT_ROOT": str(cwd)}
    return subprocess.run(
        [sys.executable, *args], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout
    )


# Tiny models for the inference tests; init std 0.2 makes logits O(1) so greedy paths are non-trivial.
TINY_BASE = dict(
    vocab_size=64,
    d_model=32,
    n_heads=2,
    swa_window=8,
    retrieval_chunk_size=4,
    retrieval_top_k=2,
    dn_chunk_size=8,
    mtp_depth=2,
    initializer_range=0.2,
)
# The hybrid stack with GQA and 8-token chunks that the training, memory and backend tests share; each adds
# the window, memory and MTP depth it studies.
MIXED_GQA = dict(
    vocab_size=64,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    layer_types=["deltanet", "retrieval", "swa"],
    retrieval_chunk_size=8,
    retrieval_top_k=2,
    dn_chunk_size=8,
    initializer_range=0.2,
)
# every registered layer type on its own (two layers), and a hybrid stack
LAYER_SETS = {**{t: [t, t] for t in LAYER_TYPES}, "mixed": ["deltanet", "retrieval", "swa"]}


def tiny(layers="mixed", seed=0, **overrides):
    import torch

    from hydralm import HydraConfig, HydraLM

    torch.manual_seed(seed)
    types = LAYER_SETS[layers]
    return HydraLM(HydraConfig(**{**TINY_BASE, "n_layers": len(types), "layer_types": types, **overrides})).eval()


# A model the StaticDecoder runs: chunks of 8, 2 exact chunks and a pool of 4 compressed chunks, so a few
# dozen decoded tokens complete chunks, compress and evict.
STATIC_MEMORY = dict(exact_window=16, compress_every=4, pool_size=8)


def static_model(memory=STATIC_MEMORY, layer_types=("deltanet", "swa", "retrieval"), **overrides):
    import torch

    from hydralm import HydraConfig, HydraLM

    torch.manual_seed(0)
    cfg = HydraConfig(
        vocab_size=64,
        d_model=32,
        n_layers=len(layer_types),
        n_heads=4,
        n_kv_heads=2,
        layer_types=list(layer_types),
        swa_window=16,
        retrieval_chunk_size=8,
        retrieval_top_k=2,
        initializer_range=0.2,
        memory=memory,
        **overrides,
    )
    return HydraLM(cfg).eval()


def assert_states_close(a, b, atol: float) -> None:
    """Two decode states hold the same stream: equal counters, tensors within atol (valid entries only)."""
    import torch

    assert len(a) == len(b)
    for layer_a, layer_b in zip(a, b):
        assert type(layer_a) is type(layer_b)
        ca, cb = layer_a.contents(), layer_b.contents()
        assert ca.keys() == cb.keys()
        for key in ca:
            if torch.is_tensor(ca[key]):
                torch.testing.assert_close(ca[key], cb[key], rtol=0, atol=atol, msg=f"{type(layer_a).__name__}.{key}")
            else:
                assert ca[key] == cb[key], key


def stored_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while fn() runs (what activation memory is)."""
    import torch

    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
