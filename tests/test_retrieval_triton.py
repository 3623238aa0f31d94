"""The Triton retrieval-attention kernel (kernels/retrieval/triton_sparse.py) and the blocked router against the
dense reference (kernels/retrieval/reference.py) and `route_tokens`.

Off GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before any kernel is
defined), which executes their own code with IEEE fp32 dots; shapes stay small because the interpreter's cost
is per operation. On a GPU the same comparisons in TF32 and bf16, at larger shapes, are
`python -m benchmarks.gpu_check retrieval`.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hydralm.kernels.attention.local import repeat_kv  # noqa: E402
from hydralm.kernels.retrieval import triton_sparse  # noqa: E402
from hydralm.kernels.retrieval.reference import retrieval_attention_reference, retrieval_mask_reference  # noqa: E402
from hydralm.kernels.retrieval.routing import (  # noqa: E402
    chunk_summaries,
    route_tokens,
    route_tokens_blocked,
    topk_lowest_id,
)
from hydralm.kernels.retrieval.selection_csr import selection_csr, tile_work_list  # noqa: E402
from hydralm.kernels.retrieval.triton_routing import route_ranges_triton, route_tokens_triton  # noqa: E402
from hydralm.kernels.retrieval.triton_sparse import retrieval_attention_triton  # noqa: E402
from hydralm.kernels.triton_common import triton_available  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 kernel vs fp64 reference on the same values: observed errors ~1e-6 on outputs and gradients of size ~1
TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(B, H, H_kv, N, D, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=gen)
    k, v = (torch.randn(B, H_kv, N, D, generator=gen) for _ in range(2))
    weight = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)  # a random projection of the output
    if strided:  # (B, N, H, D) memory viewed as (B, H, N, D), as the layer's projections hand them over
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v, weight


def _kernel_out_and_grads(q, k, v, weight, chunk_size, top_k):
    leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in (q, k, v)]  # strides kept
    out = retrieval_attention_triton(*leaves, chunk_size, top_k)
    (out.double() * weight.to(DEVICE)).sum().backward()
    return [out.detach().double().cpu()] + [t.grad.double().cpu() for t in leaves]


def _reference_out_and_grads(q, k, v, weight, chunk_size, top_k):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    groups = q.shape[1] // k.shape[1]
    out = retrieval_attention_reference(
        leaves[0], repeat_kv(leaves[1], groups), repeat_kv(leaves[2], groups), chunk_size, top_k
    )
    (out * weight).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _assert_matches_reference(got, expected):
    for name, g, e in zip(["out", "dq", "dk", "dv"], got, expected):
        torch.testing.assert_close(g, e, **TOL, msg=lambda m: f"{name}: {m}")


# Ragged N (last chunk partial), GQA and MHA, chunk sizes 16 .. 128 (48: not a power of two, so masked key
# tiles and three 16-row dK/dV blocks per chunk), D not a power of two, top_k 1 .. 16 (16: more than any token
# has chunks to pick), the first chunks alone (N <= 3C: few or no selections) and q/k/v as strided views. In the
# interpreter a tile holds 16 query slots and a dK/dV segment 32, so lists span several tiles and the longer
# ones are split into segments.
@pytest.mark.parametrize(
    "B,H,H_kv,N,D,C,top_k,strided",
    [
        (1, 4, 2, 83, 16, 16, 3, True),
        (1, 2, 2, 150, 24, 48, 2, False),
        (1, 1, 1, 300, 16, 128, 1, False),
        (1, 2, 1, 120, 16, 16, 16, False),
        (1, 2, 2, 40, 16, 16, 2, False),
        (1, 2, 1, 30, 16, 16, 2, False),
    ],
)
def test_triton_kernel_matches_the_reference_in_outputs_and_all_gradients(B, H, H_kv, N, D, C, top_k, strided):
    q, k, v, weight = _inputs(B, H, H_kv, N, D, strided=strided)
    got = _kernel_out_and_grads(q, k, v, weight, C, top_k)
    _assert_matches_reference(got, _reference_out_and_grads(q, k, v, weight, C, top_k))


def test_the_comparison_fails_when_one_selection_is_dropped(monkeypatch):
    """Sabotage: the per-chunk lists lose one query slot (the first of the longest list), so that token misses
    one of its chunks; the comparison with the reference must then fail."""
    q, k, v, weight = _inputs(1, 2, 1, 83, 16)
    expected = _reference_out_and_grads(q, k, v, weight, 16, 2)
    real = selection_csr

    def drop_one_entry(selected, n_kv_heads, n_chunks):
        entries, offsets = real(selected, n_kv_heads, n_chunks)
        longest = int((offsets[1:] - offsets[:-1]).argmax())
        at = int(offsets[longest])
        entries = torch.cat([entries[:at], entries[at + 1 :], entries[at : at + 1]])
        offsets = torch.cat([offsets[: longest + 1], offsets[longest + 1 :] - 1])
        return entries, offsets

    monkeypatch.setattr(triton_sparse, "selection_csr", drop_one_entry)
    got = _kernel_out_and_grads(q, k, v, weight, 16, 2)
    with pytest.raises(AssertionError):
        _assert_matches_reference(got, expected)


def test_a_rows_result_is_bit_identical_whatever_the_other_rows_hold_and_from_run_to_run():
    """C2 (rows of a batch independent) exactly, in fp32, and deterministic gradients (no atomics)."""
    q, k, v, weight = _inputs(2, 2, 1, 60, 16)
    first = _kernel_out_and_grads(q, k, v, weight, 16, 3)
    again = _kernel_out_and_grads(q, k, v, weight, 16, 3)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    q2, k2, v2, _ = _inputs(2, 2, 1, 60, 16, seed=1)
    q2[0], k2[0], v2[0] = q[0], k[0], v[0]  # row 0 kept, row 1 changed
    other = _kernel_out_and_grads(q2, k2, v2, weight, 16, 3)
    for a, b in zip(first, other):
        assert torch.equal(a[0], b[0])
        assert not torch.equal(a[1:], b[1:])


def test_topk_lowest_id_breaks_ties_towards_the_lowest_index():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(-2, 3, (200, 23), generator=gen).float()
    scores[:5] = float("-inf")  # all ineligible, as at the start of a sequence
    values, idx = topk_lowest_id(scores, 6)
    for row in range(scores.shape[0]):
        expected = sorted(range(23), key=lambda j: (-scores[row, j].item(), j))[:6]
        assert idx[row].tolist() == expected
        assert torch.equal(values[row], scores[row, expected])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_lowest_id_with_ids_breaks_ties_towards_the_lowest_id(dtype):
    """Columns in ring order (the decode step's slots): ties go to the lowest id, not the lowest column; the
    indices still point at columns. Fails if the ids are ignored (they are a shuffled, partly negative range)."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(-2, 3, (200, 23), generator=gen).to(dtype)
    scores[:5] = float("-inf")
    ids = torch.randperm(23, generator=gen) - 5
    values, idx = topk_lowest_id(scores, 6, ids=ids)
    for row in range(scores.shape[0]):
        expected = sorted(range(23), key=lambda j: (-scores[row, j].item(), ids[j].item()))[:6]
        assert idx[row].tolist() == expected
        assert torch.equal(values[row], scores[row, expected])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H,H_kv,C,top_k", [(4, 2, 4, 3), (2, 2, 8, 5)])
def test_blocked_router_equals_route_tokens_and_the_reference_with_ties_forced(dtype, H, H_kv, C, top_k):
    """Queries and keys in {-1, 0, 1}: scores are small integers, computed exactly, with many exact ties; all
    three keep the lowest chunk id among equal scores (blocks of 13 queries: not aligned with the chunks)."""
    gen = torch.Generator().manual_seed(0)
    B, N, D = 2, 77, 4
    q = torch.randint(-1, 2, (B, H, N, D), generator=gen).to(dtype)
    k = torch.randint(-1, 2, (B, H_kv, N, D), generator=gen).to(dtype)
    summaries = chunk_summaries(k, C)
    blocked = route_tokens_blocked(q, summaries, C, top_k, block=13)
    n_eligible = (torch.arange(N) // C - 1).clamp(min=0)
    selected, valid = route_tokens(q, [summaries], n_eligible, top_k)
    assert torch.equal(blocked, torch.where(valid, selected, -1).to(torch.int32))
    # the reference's mask, built by its own sort (stable: lowest id first among ties)
    groups = H // H_kv
    allowed = retrieval_mask_reference(q, repeat_kv(k, groups), C, top_k)
    chunk_of_key = torch.arange(N) // C
    token_chunk = torch.arange(N) // C
    routed = torch.zeros_like(allowed)
    for slot in range(top_k):
        ids = blocked[..., slot].long()
        routed |= (chunk_of_key == ids[..., None]) & (ids[..., None] >= 0)
    local = (torch.arange(N)[None, :] <= torch.arange(N)[:, None]) & (chunk_of_key[None, :] >= token_chunk[:, None] - 1)
    assert torch.equal(routed | local, allowed)


@pytest.mark.parametrize("N, C, top_k, ints", [(40, 4, 3, True), (136, 2, 8, True), (100, 2, 5, False)])
def test_triton_router_equals_route_tokens_with_ties_forced(N, C, top_k, ints):
    """The routing kernel of the CUDA path (here in the interpreter, 16 summaries per block): exact integer
    scores with many ties, and more chunks than a block, so a query's top-k is carried across blocks (the
    threshold filter; top_k 8 fills every slot the kernel keeps, so a tie let in wrongly shows); random scores."""
    gen = torch.Generator().manual_seed(1)
    draw = (
        (lambda *shape: torch.randint(-1, 2, shape, generator=gen).float())
        if ints
        else (lambda *shape: torch.randn(shape, generator=gen))
    )
    q, k = draw(1, 2, N, 4), draw(1, 1, N, 4)
    summaries = chunk_summaries(k, C)
    expected = route_tokens_blocked(q, summaries, C, top_k)
    assert torch.equal(route_tokens_triton(q.to(DEVICE), summaries.to(DEVICE), C, top_k).cpu(), expected)


def test_ranged_triton_router_equals_route_tokens_with_ties_forced():
    """The router of calls with a state: per chunk of the call a range [first, end) of the held summaries (pool,
    bank, the call's completed chunks), some empty; exact integer scores with many ties, GQA."""
    gen = torch.Generator().manual_seed(2)
    C, top_k, n_held = 4, 3, 10
    q = torch.randint(-1, 2, (1, 2, 36, 4), generator=gen).float()
    summaries = torch.randint(-1, 2, (1, 1, n_held, 4), generator=gen).float()
    end = torch.randint(0, n_held + 1, (9,), generator=gen)
    first = torch.minimum(torch.randint(0, n_held, (9,), generator=gen), end)
    end[0], first[1], end[1] = 0, 0, n_held  # a chunk with nothing to pick, one with everything
    first[2] = -3  # below the first held summary: no bound (as route_tokens reads it)
    selected, valid = route_tokens(q.unflatten(2, (9, C)), [summaries], end[:, None], top_k, first[:, None])
    expected = torch.where(valid, selected, -1).flatten(2, 3).to(torch.int32)
    got = route_ranges_triton(q.to(DEVICE), summaries.to(DEVICE), C, top_k, first.to(DEVICE), end.to(DEVICE))
    assert torch.equal(got.cpu(), expected)
    assert (expected[:, :, :C] == -1).all() and (expected[:, :, C : 2 * C] >= 0).all()


def test_selection_lists_and_tiles_cover_every_valid_selection_once():
    gen = torch.Generator().manual_seed(0)
    B, H, H_kv, N, top_k, n_chunks = 2, 4, 2, 50, 3, 9
    selected = torch.randint(-1, n_chunks, (B, H, N, top_k), generator=gen).to(torch.int32)
    entries, offsets = selection_csr(selected, H_kv, n_chunks)
    flat = selected.flatten()
    assert int(offsets[-1]) == int((flat >= 0).sum())
    for lst in range(B * H_kv * n_chunks):
        b, head, chunk = lst // (H_kv * n_chunks), (lst // n_chunks) % H_kv, lst % n_chunks
        members = entries[offsets[lst] : offsets[lst + 1]].long()
        assert torch.equal(members, members.sort().values)  # increasing: a stable order
        rows = members // top_k
        assert torch.all(flat[members] == chunk)
        assert torch.all(rows // (H * N) == b) and torch.all((rows // N) % H // (H // H_kv) == head)
    tile_list, tile_start = tile_work_list(offsets, entries.numel(), 4)
    covered = torch.zeros(entries.numel(), dtype=torch.int32)
    for lst, start in zip(tile_list.tolist(), tile_start.tolist()):
        if lst >= 0:
            covered[start : min(start + 4, int(offsets[lst + 1]))] += 1
    assert torch.all(covered[: int(offsets[-1])] == 1) and torch.all(covered[int(offsets[-1]) :] == 0)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(top_k=0), "top_k=0"),
        (dict(k=torch.zeros(1, 3, 8, 16)), "H_kv dividing H=2"),
        (dict(q=torch.zeros(1, 2, 8, 16, dtype=torch.float64)), "float32, float16, bfloat16"),
    ],
)
def test_bad_inputs_get_one_clear_error(change, message):
    args = dict(q=torch.zeros(1, 2, 8, 16), k=torch.zeros(1, 1, 8, 16), v=torch.zeros(1, 1, 8, 16))
    args.update(chunk_size=4, top_k=2)
    args.update(change)
    if "k" in change:
        args["v"] = change["k"]
    with pytest.raises(ValueError, match=message):
        retrieval_attention_triton(**{name: t.to(DEVICE) if torch.is_tensor(t) else t for name, t in args.items()})


def test_a_model_trains_the_same_with_the_triton_kernel_as_with_the_gather_path(monkeypatch):
    """HYDRALM_RETRIEVAL=triton routes the layer's parallel forward through the kernel: the loss and every
    parameter gradient equal the PyTorch gather path's (ragged length, GQA)."""
    from hydralm import HydraConfig, HydraLM

    cfg = HydraConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        layer_types=["retrieval", "deltanet"],
        retrieval_chunk_size=8,
        retrieval_top_k=2,
    )
    torch.manual_seed(0)
    model = HydraLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 70))

    def loss_and_grads(backend):
        monkeypatch.setenv("HYDRALM_RETRIEVAL", backend)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids)["logits"].flatten(0, 1), ids.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_torch, grads_torch = loss_and_grads("torch")
    loss_triton, grads_triton = loss_and_grads("triton")
    torch.testing.assert_close(loss_triton, loss_torch, atol=1e-5, rtol=1e-5)
    assert grads_triton.keys() == grads_torch.keys()
    for name in grads_torch:
        torch.testing.assert_close(grads_triton[name], grads_torch[name], atol=1e-5, rtol=1e-4, msg=name)


def test_with_memory_compressed_reads_take_the_kernels_forward_or_with_gradients_the_gather_path(monkeypatch):
    """With compressive memory (chunks of 8, 2 exact chunks) a forward of up to 24 tokens reads nothing compressed and
    runs the from-scratch kernel. A longer one, whose late tokens read chunks compressed, runs the forward from
    sources without gradients (equal to HYDRALM_RETRIEVAL=torch within tolerance) and the gather path with them
    (bit for bit: that path has no Triton backward)."""
    from hydralm import HydraConfig, HydraLM

    cfg = HydraConfig(
        vocab_size=50,
        d_model=32,
        n_layers=1,
        n_heads=2,
        layer_types=["retrieval"],
        retrieval_chunk_size=8,
        retrieval_top_k=2,
        memory=dict(exact_window=16, compress_every=4, pool_size=8),
    )
    torch.manual_seed(0)
    model = HydraLM(cfg).eval()
    scratch, sources = [], []
    monkeypatch.setattr(triton_sparse, "retrieval_attention_triton", _counting(scratch, retrieval_attention_triton))
    monkeypatch.setattr(
        triton_sparse,
        "retrieval_forward_from_sources",
        _counting(sources, triton_sparse.retrieval_forward_from_sources),
    )
    for N, grad, path in ((24, False, "scratch"), (40, False, "sources"), (40, True, "gather")):
        ids = torch.randint(0, cfg.vocab_size, (2, N))
        with torch.set_grad_enabled(grad):
            monkeypatch.setenv("HYDRALM_RETRIEVAL", "torch")
            expected = model(ids)["logits"]
            monkeypatch.setenv("HYDRALM_RETRIEVAL", "triton")
            scratch.clear(), sources.clear()
            got = model(ids)["logits"]
        assert (bool(scratch), bool(sources)) == (path == "scratch", path == "sources")
        if path == "gather":
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize(
    "memory, n_kv_heads",
    [
        (None, 1),
        (dict(exact_window=16, compress_every=4, pool_size=8), 1),
        (dict(exact_window=16, compress_every=4, pool_size=8), 2),
    ],
    ids=["bank-gqa", "memory-gqa", "memory-mha"],
)
def test_calls_with_a_state_run_the_kernels_and_match_the_gather_path(monkeypatch, memory, n_kv_heads, routing="torch"):
    """A stream cut into uneven pieces (chunk in progress, chunk completions, compressed reads, evictions) through
    the kernels' forward from sources (HYDRALM_RETRIEVAL=triton) equals the gather path piece by piece; `routing`
    is HYDRALM_STREAM_ROUTING for the kernels' run."""
    from hydralm import HydraConfig, HydraLM

    cfg = HydraConfig(
        vocab_size=50, d_model=32, n_layers=1, n_heads=2, n_kv_heads=n_kv_heads, layer_types=["retrieval"],
        retrieval_chunk_size=8, retrieval_top_k=2, memory=memory,
    )  # fmt: skip
    torch.manual_seed(0)
    model = HydraLM(cfg).eval()
    calls = []
    monkeypatch.setattr(
        triton_sparse, "retrieval_forward_from_sources", _counting(calls, triton_sparse.retrieval_forward_from_sources)
    )
    ids = torch.randint(0, cfg.vocab_size, (2, 150))
    states = {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            monkeypatch.setenv("HYDRALM_RETRIEVAL", backend)
            monkeypatch.setenv("HYDRALM_STREAM_ROUTING", routing if backend == "triton" else "torch")
            state, outs = None, []
            for a, b in ((0, 13), (13, 40), (40, 41), (41, 97), (97, 150)):
                out = model(ids[:, a:b], state=state, return_state=True)
                state = out["state"]
                outs.append(out["logits"])
            states[backend] = torch.cat(outs, dim=1)
    assert len(calls) == 4  # every piece after the first (the first has no state: the from-scratch kernel)
    torch.testing.assert_close(states["triton"], states["torch"], **TOL)


def test_calls_with_a_state_route_with_the_triton_kernel_as_in_pytorch(monkeypatch):
    """HYDRALM_STREAM_ROUTING=triton: the same stream, its routing by the ranged Triton router (every call with a
    state, counted), equals the gather path with PyTorch routing."""
    from hydralm.kernels.retrieval import triton_routing

    calls = []
    monkeypatch.setattr(triton_routing, "route_ranges_triton", _counting(calls, triton_routing.route_ranges_triton))
    test_calls_with_a_state_run_the_kernels_and_match_the_gather_path(
        monkeypatch, dict(exact_window=16, compress_every=4, pool_size=8), 2, routing="triton"
    )
    assert len(calls) == 4


def test_the_stream_comparison_fails_when_the_compressed_reads_are_dropped(monkeypatch):
    """Sabotage check of the test above: without the compressed source the outputs differ."""
    original = triton_sparse.retrieval_forward_from_sources

    def exact_only(q, k_local, v_local, chunk_size, sources):
        return original(q, k_local, v_local, chunk_size, sources[:1])

    monkeypatch.setattr(triton_sparse, "retrieval_forward_from_sources", exact_only)
    with pytest.raises(AssertionError):
        test_calls_with_a_state_run_the_kernels_and_match_the_gather_path(
            monkeypatch, dict(exact_window=16, compress_every=4, pool_size=8), 1
        )


def _counting(calls: list, fn):
    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])
        return fn(*args, **kwargs)

    return counted
