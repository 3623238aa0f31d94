"""Compressive memory: bounded inference state (C4), exactness inside the exact window, the learned
compressor and its reconstruction loss, and the tier counters."""

import pytest
import torch
from helpers import MIXED_GQA

from hydralm import HydraConfig, HydraLM
from hydralm.modules.compressive_memory import CompressiveMemory

MEMORY = {"exact_window": 32, "compress_every": 4, "pool_size": 16}  # 4 exact chunks; 16 slots = 8 pooled chunks
CFG = HydraConfig(**MIXED_GQA, swa_window=8, memory=MEMORY)


def _tensor_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for layer in state for t in layer.tensors().values())


def _stream(model, ids, chunk):
    state = None
    with torch.no_grad():
        for a in range(0, ids.shape[1], chunk):
            state = model(ids[:, a : a + chunk], state=state, return_state=True)["state"]
    return state


def test_c4_state_bytes_do_not_grow_with_stream_length():
    model = HydraLM(CFG).eval()
    ids = torch.randint(0, 64, (1, 32768))
    short, long = _stream(model, ids[:, :4096], 512), _stream(model, ids, 512)
    assert _tensor_bytes(short) == _tensor_bytes(long)
    without = HydraLM(CFG.replace(memory=None)).eval()
    assert _tensor_bytes(_stream(without, ids[:, :8192], 512)) > _tensor_bytes(_stream(without, ids[:, :4096], 512))


def test_tier_counters_follow_the_stream():
    model = HydraLM(CFG).eval()
    state = _stream(model, torch.randint(0, 64, (2, 200)), 37)
    layer = state[1]
    completed = 200 // 8  # 25 chunks
    assert layer.n_chunks == 4 and layer.n_pool == 8
    assert layer.compressed == completed - 4 and layer.evicted == completed - 12


def test_memory_is_exact_inside_the_exact_window():
    """Until a chunk leaves the exact window nothing is compressed: C1 holds as without memory."""
    model = HydraLM(CFG).eval()
    ids = torch.randint(0, 64, (2, 40))  # 5 chunks: the 5th completes at token 40, after every query
    with torch.no_grad():
        parallel = model(ids)["logits"]
        state, steps = None, []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    assert (parallel - torch.stack(steps, 1)).abs().max() < 1e-4


def test_step_decoding_reads_compressed_chunks_and_stays_finite():
    model = HydraLM(CFG).eval()
    ids = torch.randint(0, 64, (1, 160))
    with torch.no_grad():
        state = model(ids[:, :120], return_state=True)["state"]
        assert state[1].n_pool > 0
        for t in range(120, 160):
            logits, state = model.step(ids[:, t], state)
            assert torch.isfinite(logits).all()
    assert state[1].n_chunks <= 4 and state[1].n_pool <= 8


def test_training_forward_reports_a_reconstruction_loss_that_trains_only_the_compressor():
    model = HydraLM(CFG).train()
    out = model(torch.randint(0, 64, (2, 64)))
    loss = out["memory_aux_loss"]
    assert loss is not None and loss.ndim == 0 and loss > 0
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"blocks.1.mixer.memory.pool_query"}
    assert HydraLM(CFG).eval()(torch.randint(0, 64, (1, 16)))["memory_aux_loss"] is None


def test_compressor_learns_to_reconstruct_attention():
    torch.manual_seed(0)
    memory = CompressiveMemory(n_heads=2, head_dim=16, exact_window=8, compress_every=4, pool_size=4)
    k, v = torch.randn(8, 2, 16, 16), torch.randn(8, 2, 16, 16)
    k[:, :, ::4] *= 4  # one salient key per block: mean pooling blurs it, attention pooling can find it
    q = k[:, :, ::4] + 0.1 * torch.randn(8, 2, 4, 16)
    optimizer = torch.optim.Adam(memory.parameters(), lr=0.05)
    first = memory.reconstruction_loss(q, k, v).item()
    for _ in range(100):
        loss = memory.reconstruction_loss(q, k, v)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first
    ck, cv = memory.compress(k, v)
    assert ck.shape == (8, 2, 4, 16) and cv.shape == (8, 2, 4, 16)


def test_memory_config_accepts_a_dict_and_checks_fit_with_chunks():
    from omegaconf import OmegaConf

    yaml_memory = OmegaConf.create({"exact_window": 32, "compress_every": 4, "pool_size": 16})
    assert HydraConfig(**{**CFG.to_dict(), "memory": yaml_memory}).memory["loss_weight"] == 1.0
    with pytest.raises(ValueError, match="memory.exact_window"):
        CFG.replace(memory={**MEMORY, "exact_window": 12})
    with pytest.raises(ValueError, match="memory.compress_every"):
        CFG.replace(memory={**MEMORY, "compress_every": 3})
    with pytest.raises(ValueError, match="memory.pool_size"):
        CFG.replace(memory={**MEMORY, "pool_size": 1})


def test_state_holds_no_views_of_a_prefill_chunks_activations():
    """A state tensor that is a view of a large prefill tensor would keep it alive (and make state_bytes
    depend on the last chunk's size): every state tensor owns exactly its own storage, memory on or off."""
    for cfg in (CFG, CFG.replace(memory=None)):
        state = HydraLM(cfg).eval()(torch.randint(0, 64, (1, 203)), return_state=True)["state"]
        for layer in state:
            for key, value in layer.tensors().items():
                if key not in ("bank_k", "bank_v", "summaries"):
                    assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key


def test_chunk_sized_prefill_matches_step_decoding_with_compressed_chunks():
    """Prefilling C tokens at a time compresses at the same moments as decoding token by token, so both
    read the same pool and exact chunks: the logits agree once chunks are compressed and evicted too."""
    model = HydraLM(CFG).eval()
    ids = torch.randint(0, 64, (2, 136))
    C = CFG.retrieval_chunk_size
    with torch.no_grad():
        state, chunked = None, []
        for a in range(0, ids.shape[1], C):
            out = model(ids[:, a : a + C], state=state, return_state=True)
            state = out["state"]
            chunked.append(out["logits"])
        assert state[1].n_pool > 0 and state[1].evicted > 0
        state, steps = None, []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    assert (torch.cat(chunked, 1) - torch.stack(steps, 1)).abs().max() < 1e-4
