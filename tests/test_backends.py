"""Backend switches and the flex_attention paths (forward on CPU; fwd+bwd on GPU: benchmarks.gpu_check)."""

import pytest
import torch
from helpers import MIXED_GQA

from hydralm import HydraConfig, HydraLM
from hydralm.kernels import backend
from hydralm.kernels.attention.flex import TILE, _sliding_window_mask, sliding_window_flex
from hydralm.kernels.attention.local import repeat_kv, sliding_window_attention
from hydralm.kernels.retrieval.flex import retrieval_block_mask, retrieval_flex
from hydralm.kernels.retrieval.reference import retrieval_attention_reference, retrieval_mask_reference


@pytest.mark.parametrize("length,window", [(256, 48), (300, 128), (700, 200), (520, 1000), (260, 1)])
def test_flex_sliding_window_matches_the_blocked_sdpa_path(length, window):
    # lengths off the 128-token tile, windows below, at and above it: the block mask is built from its block
    # structure, and must list every tile pair (partial or full) that some query and key in the window share
    q, k, v = torch.randn(2, 4, length, 16), torch.randn(2, 2, length, 16), torch.randn(2, 2, length, 16)
    with torch.no_grad():
        expected = sliding_window_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), window=window)
        torch.testing.assert_close(sliding_window_flex(q, k, v, window=window), expected, atol=2e-5, rtol=1e-4)


def _blocks(num: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    dense = torch.zeros(n, n, dtype=torch.bool)
    for row in range(n):
        dense[row, ids[0, 0, row, : num[0, 0, row]].long()] = True
    return dense


@pytest.mark.parametrize("length", [128, 300, 777])
def test_sliding_window_block_mask_lists_exactly_the_tiles_the_window_touches(length):
    # brute force over every window up to past the length: a tile pair is listed iff some in-range query sees
    # some key in it, and listed as full iff every in-range pair of it is in the window
    n, tile = -(-length // TILE), TILE
    pos = torch.arange(n * tile)
    q, kv = pos[:, None], pos[None, :]
    in_range = (q < length) & (kv < length)
    for window in range(1, length + 2 * tile, 7 if length > 300 else 1):
        seen = (kv <= q) & (q - kv < window)
        any_ = (seen & in_range).unflatten(0, (n, tile)).unflatten(2, (n, tile)).any(3).any(1)
        all_ = (seen | ~in_range).unflatten(0, (n, tile)).unflatten(2, (n, tile)).all(3).all(1)
        mask = _sliding_window_mask(length, window, "cpu")
        full = _blocks(mask.full_kv_num_blocks, mask.full_kv_indices, n)
        partial = _blocks(mask.kv_num_blocks, mask.kv_indices, n)
        assert not (full & partial).any(), window
        assert torch.equal(full | partial, any_), window
        assert not (full & ~all_).any(), window  # a full tile skips the mask: it must really be full


@pytest.mark.parametrize("chunk,top_k", [(32, 2), (64, 3), (128, 1)])
def test_flex_retrieval_matches_the_dense_mask_reference(chunk, top_k):
    q, k, v = (torch.randn(1, 2, 512, 16) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(
            retrieval_flex(q, k, v, chunk, top_k),
            retrieval_attention_reference(q, k, v, chunk, top_k),
            atol=2e-5,
            rtol=1e-4,
        )


@pytest.mark.parametrize("chunk", [64, 128])
def test_flex_retrieval_full_blocks_are_exactly_the_tiles_every_query_reads_in_full(chunk):
    # the 128 queries of each tile share one direction, so they select the same chunks: the kernel skips
    # mask_mod on full tiles (the CPU flex forward does not, so the block mask itself is checked here)
    torch.manual_seed(0)
    k = torch.randn(1, 2, 1024, 16)
    q = (4 * torch.randn(1, 2, 8, 1, 16) + 0.1 * torch.randn(1, 2, 8, 128, 16)).flatten(2, 3)
    block_mask = retrieval_block_mask(q, k, chunk, 2)
    allowed = retrieval_mask_reference(q, k, chunk, 2).unflatten(3, (8, 128)).unflatten(2, (8, 128))
    read_in_full, read_at_all = allowed.all(-1).all(-2), allowed.any(-1).any(-2)  # (B, H, q tile, kv tile)

    def tiles(num_blocks, indices):
        dense = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
        for h in range(2):
            for t in range(8):
                dense[0, h, t, indices[0, h, t, : num_blocks[0, h, t]].long()] = True
        return dense

    full = tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    partial = tiles(block_mask.kv_num_blocks, block_mask.kv_indices)
    assert torch.equal(full, read_in_full) and not (full & partial).any()
    assert torch.equal(full | partial, read_at_all)
    assert int(full.sum()) > (2 * 7 if chunk == 128 else 0)  # selected tiles are full too, not just local ones


def test_model_forward_is_the_same_with_flex_and_torch_attention(monkeypatch):
    cfg = HydraConfig(**{**MIXED_GQA, "retrieval_chunk_size": 32, "dn_chunk_size": 64}, swa_window=40)
    model = HydraLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 256))
    with torch.no_grad():
        monkeypatch.setenv("HYDRALM_ATTENTION", "torch")
        reference = model(ids)["logits"]
        monkeypatch.setenv("HYDRALM_ATTENTION", "flex")
        torch.testing.assert_close(model(ids)["logits"], reference, atol=1e-4, rtol=1e-4)


def test_backend_switches_validate_and_auto_never_picks_unsafe_paths(monkeypatch):
    monkeypatch.setenv("HYDRALM_ATTENTION", "fast")
    with pytest.raises(ValueError, match="HYDRALM_ATTENTION='fast'"):
        backend.attention_backend(False)
    monkeypatch.delenv("HYDRALM_ATTENTION")
    assert backend.attention_backend(False) == "torch" and backend.attention_backend(True) == "flex"
    monkeypatch.setenv("HYDRALM_DELTANET", "auto")
    assert backend.deltanet_backend(is_cuda=False, needs_grad=False) == "torch"
    monkeypatch.setattr(backend, "fla_available", lambda: True)
    monkeypatch.setattr(backend, "fla_backward_safe", lambda: False)  # Hopper + triton < 3.7.1 (fla#640)
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert backend.deltanet_backend(is_cuda=True, needs_grad=True) == "torch"
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert backend.deltanet_backend(is_cuda=True, needs_grad=True) == "fused"  # our kernels, not fla's backward
    assert backend.deltanet_backend(is_cuda=True, needs_grad=False) == "fused"  # fla only when asked for
    assert backend.deltanet_backend(is_cuda=False, needs_grad=True) == "torch"  # auto never interprets on CPU
    monkeypatch.setenv("HYDRALM_DELTANET", "fla")
    with pytest.raises(RuntimeError, match="fla#640"):
        backend.deltanet_backend(is_cuda=True, needs_grad=True)
    monkeypatch.setenv("HYDRALM_DELTANET", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="HYDRALM_DELTANET=triton needs"):
        backend.deltanet_backend(is_cuda=False, needs_grad=True)
    monkeypatch.setenv("HYDRALM_DELTANET", "fused")
    with pytest.raises(RuntimeError, match="HYDRALM_DELTANET=fused needs"):
        backend.deltanet_backend(is_cuda=False, needs_grad=True)


def test_retrieval_and_gdn_module_switches_pick_only_checked_paths(monkeypatch):
    for name in ("HYDRALM_RETRIEVAL", "HYDRALM_ATTENTION", "HYDRALM_GDN_MODULES", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert backend.retrieval_backend(is_cuda=False) == "torch"
    assert backend.retrieval_backend(is_cuda=True) == "triton"  # passed gpu_check retrieval
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert backend.retrieval_backend(is_cuda=True) == "flex"
    monkeypatch.setenv("HYDRALM_ATTENTION", "torch")
    assert backend.retrieval_backend(is_cuda=True) == "torch"
    monkeypatch.setenv("HYDRALM_RETRIEVAL", "triton")
    with pytest.raises(RuntimeError, match="HYDRALM_RETRIEVAL=triton needs"):
        backend.retrieval_backend(is_cuda=False)
    monkeypatch.setattr(backend, "fla_modules_available", lambda: True)
    assert backend.gdn_modules_backend(is_cuda=True) == "fla"  # auto: fla's modules on CUDA (GPU check passed)
    assert backend.gdn_modules_backend(is_cuda=False) == "torch"
    monkeypatch.setenv("HYDRALM_GDN_MODULES", "torch")
    assert backend.gdn_modules_backend(is_cuda=True) == "torch"
    monkeypatch.setenv("HYDRALM_GDN_MODULES", "fla")
    assert backend.gdn_modules_backend(is_cuda=True) == "fla"
    monkeypatch.setattr(backend, "fla_modules_available", lambda: False)
    monkeypatch.setenv("HYDRALM_GDN_MODULES", "auto")
    assert backend.gdn_modules_backend(is_cuda=True) == "torch"  # no fla-core: the PyTorch modules


@pytest.mark.parametrize(
    "name,path,pick",
    [
        ("HYDRALM_DECODE", "fused", backend.decode_backend),
        ("HYDRALM_DECODE_LINEAR", "fused", backend.decode_linear_backend),
        ("HYDRALM_DECODE_MANY", "fused", backend.decode_many_backend),
        ("HYDRALM_STREAM_ROUTING", "triton", backend.stream_routing_backend),
        ("HYDRALM_NORM", "triton", backend.norm_backend),
    ],
)
def test_checked_triton_switches_pick_their_path_on_cuda_only(monkeypatch, name, path, pick):
    for var in (name, "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert pick(is_cuda=True) == path  # auto: the Triton path on CUDA (its GPU check passed)
    assert pick(is_cuda=False) == "torch"
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert pick(is_cuda=True) == "torch"  # no triton: PyTorch
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setenv(name, "torch")
    assert pick(is_cuda=True) == "torch"
    monkeypatch.setenv(name, path)
    assert pick(is_cuda=True) == path
    with pytest.raises(RuntimeError, match=f"{name}={path} needs"):
        pick(is_cuda=False)
    monkeypatch.setenv(name, "fast")
    with pytest.raises(ValueError, match=f"{name}='fast' is invalid"):
        pick(is_cuda=True)


def test_packed_deltanet_inputs_are_the_cuda_default_and_a_validated_switch(monkeypatch):
    monkeypatch.delenv("HYDRALM_DELTANET_PACKED", raising=False)
    assert backend.deltanet_packed(is_cuda=True) and not backend.deltanet_packed(is_cuda=False)
    monkeypatch.setenv("HYDRALM_DELTANET_PACKED", "0")
    assert not backend.deltanet_packed(is_cuda=True)
    monkeypatch.setenv("HYDRALM_DELTANET_PACKED", "1")
    assert backend.deltanet_packed(is_cuda=False)
    monkeypatch.setenv("HYDRALM_DELTANET_PACKED", "yes")
    with pytest.raises(ValueError, match="HYDRALM_DELTANET_PACKED='yes' is invalid"):
        backend.deltanet_packed(is_cuda=True)


@pytest.mark.parametrize(
    "name,pick", [("HYDRALM_RETRIEVAL_DECODE", backend.retrieval_decode_backend),
                  ("HYDRALM_SWA_DECODE", backend.swa_decode_backend)]
)  # fmt: skip
def test_decode_step_kernels_are_auto_on_cuda_up_to_the_rows_they_were_timed_at(monkeypatch, name, pick):
    for var in (name, "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert pick(is_cuda=True, rows=1) == "triton" and pick(is_cuda=True, rows=backend.DECODE_KERNEL_ROWS) == "triton"
    assert pick(is_cuda=True, rows=backend.DECODE_KERNEL_ROWS + 1) == "torch"  # not timed above: the PyTorch step
    assert pick(is_cuda=False, rows=1) == "torch"
    monkeypatch.setenv(name, "triton")
    assert pick(is_cuda=True, rows=512) == "triton"  # asked by name: whatever the batch
    with pytest.raises(RuntimeError, match=f"{name}=triton needs"):
        pick(is_cuda=False)
    monkeypatch.setenv(name, "torch")
    assert pick(is_cuda=True, rows=1) == "torch"
    monkeypatch.setenv(name, "fast")
    with pytest.raises(ValueError, match=f"{name}='fast' is invalid"):
        pick(is_cuda=True)


def test_the_plain_decode_gemv_is_still_asked_by_name(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setenv("HYDRALM_DECODE_LINEAR", "gemv")
    assert backend.decode_linear_backend(is_cuda=True) == "gemv"
    with pytest.raises(RuntimeError, match="HYDRALM_DECODE_LINEAR=gemv needs"):
        backend.decode_linear_backend(is_cuda=False)


def test_kernel_verify_is_asked_by_name_only(monkeypatch):
    monkeypatch.delenv("HYDRALM_DECODE_VERIFY", raising=False)
    assert backend.decode_verify_backend() == "torch"  # auto: its GPU check has not run yet
    monkeypatch.setenv("HYDRALM_DECODE_VERIFY", "kernels")
    assert backend.decode_verify_backend() == "kernels"
    monkeypatch.setenv("HYDRALM_DECODE_VERIFY", "steps")
    with pytest.raises(ValueError, match="HYDRALM_DECODE_VERIFY='steps' is invalid"):
        backend.decode_verify_backend()
