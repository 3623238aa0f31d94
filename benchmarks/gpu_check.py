"""Correctness of the CUDA fast paths on the machine at hand: `python -m benchmarks.gpu_check`.

Each fast path is compared with the reference kernel on fresh random inputs, outputs and gradients, and
the table says PASS/FAIL against the tolerance printed next to it. Run it on every new GPU stack before
trusting `auto` (hydralm/kernels/backend.py). Sections:
`python -m benchmarks.gpu_check [delta_rule] [qk_norm] [state_pass] [fla] [flex] [static_decode] [decode_fused]
[retrieval_decode] [swa_decode] [decode_linear] [spec_decode] [retrieval] [retrieval_stream] [exactness] [gdn_block]
[cross_entropy] [rmsnorm] [swiglu] [rotary] [short_conv]`
(GPU_CHECK_DELTANET=fused,triton limits the delta_rule section to those backends, GPU_CHECK_DELTANET_SHAPES=0,2
to those of its three shapes; GPU_CHECK_RETRIEVAL_SHAPES=n
checks the retrieval kernels on the first n of their shapes only; HYDRALM_DECODE=fused runs static_decode's
decoder on the fused Gated DeltaNet step, HYDRALM_DECODE_LINEAR=gemv on the decode GEMV (=fused: with the
blocks' norms, SwiGLU products and residual adds folded into it),
HYDRALM_DECODE_MANY=fused spec_decode's verification on the fused multi-token step (=looped: its T tokens in one
launch), HYDRALM_STREAM_ROUTING=triton
retrieval_stream's and exactness's calls with a state on the ranged Triton router, HYDRALM_RETRIEVAL_DECODE=triton
and HYDRALM_SWA_DECODE=triton static_decode's decoder on the retrieval and SWA step kernels: each of these is the CUDA
default once its check has passed, and naming it checks that path even where `auto` would not pick it).
"""

import contextlib
import json
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks.speed import coherent_queries
from hydralm.kernels.attention.flex import sliding_window_flex
from hydralm.kernels.attention.local import repeat_kv, sliding_window_attention
from hydralm.kernels.delta_rule.chunk import compiled_delta_rule_chunkwise, delta_rule_chunkwise
from hydralm.kernels.delta_rule.reference import delta_rule_recurrent
from hydralm.kernels.retrieval.flex import retrieval_flex

ROWS = []


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _record(name: str, err: float, tol: float, measure: str = "rel err") -> None:
    ROWS.append({"check": name, measure.replace(" ", "_"): err, "tol": tol, "ok": err <= tol})
    print(f"{'PASS' if err <= tol else 'FAIL'}  {name:58s} {measure} {err:.2e}  (tol {tol:.0e})", flush=True)


@contextlib.contextmanager
def _env(name: str, value: Optional[str]):
    """Set (or, for None, unset) one environment switch for the duration of the block."""
    previous = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _grads(fn, inputs, weight):
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad((out.float() * weight).sum(), inputs)


def _delta_rule_inputs(B: int, H: int, T: int, D: int, device: str, decay: float):
    """fp64 leaves q, k (L2-normalised), v, g (log-decay in (-decay, 0)), beta, and a random output weight."""
    q = F.normalize(torch.randn(B, H, T, D, device=device), dim=-1)
    k = F.normalize(torch.randn(B, H, T, D, device=device), dim=-1)
    v, g = torch.randn(B, H, T, D, device=device), -torch.rand(B, H, T, device=device) * decay
    beta = torch.rand(B, H, T, device=device)
    ref_in = [t.double().requires_grad_() for t in (q, k, v, g, beta)]
    return ref_in, torch.randn(B, H, T, D, device=device, dtype=torch.float64)


def _check_delta_rule_rows(label: str, fn, ref_in, w, ref, ref_g, dtype: torch.dtype, tol: float) -> None:
    """fn on the reference inputs cast to dtype (q, k, v; g and beta fp32): its output and the gradients of q, k,
    v, g, beta against the reference's, gradients at 3x the output's tolerance."""
    inp = [t.detach().to(dtype).requires_grad_() for t in ref_in[:3]]
    inp += [t.detach().float().requires_grad_() for t in ref_in[3:]]
    out, grads = _grads(fn, inp, w.float())
    _record(f"{label} out", _rel(out, ref), tol)
    for name, ga, gb in zip("q k v g beta".split(), grads, ref_g):
        _record(f"{label} d{name}", _rel(ga, gb), tol * 3)


def check_delta_rule(device: str) -> None:
    shapes = [(2, 4, 300, 64, 64), (1, 2, 1024, 128, 64), (2, 3, 700, 100, 32)]
    # GPU_CHECK_DELTANET_SHAPES=1,2 checks those shapes only: each shape compiles every kernel anew (minutes on
    # a cold machine), so the shapes can run as parallel processes
    picked = os.environ.get("GPU_CHECK_DELTANET_SHAPES")
    for B, H, T, D, C in [shapes[int(i)] for i in picked.split(",")] if picked else shapes:
        ref_in, w = _delta_rule_inputs(B, H, T, D, device, decay=0.5)
        ref, ref_g = _grads(lambda *a: delta_rule_recurrent(*a)[0], ref_in, w) if T <= 300 else (None, None)
        if ref is None:  # long: the fp64 chunkwise form is the reference (equal to recurrent on CPU tests)
            ref, ref_g = _grads(lambda *a: delta_rule_chunkwise(*a, chunk_size=C)[0], ref_in, w)
        # (backend, input dtype, fp32 matmul precision, tol): "highest" = IEEE fp32 dots, "high" = TF32
        variants = [
            ("torch", torch.float32, "highest", 1e-4),
            ("torch", torch.bfloat16, "highest", 3e-2),
            ("triton", torch.float32, "highest", 1e-4),
            ("triton", torch.float32, "high", 3e-3),
            ("triton", torch.bfloat16, "high", 3e-2),
            ("fused", torch.float32, "highest", 1e-4),
            ("fused", torch.float32, "high", 3e-3),
            ("fused", torch.bfloat16, "high", 3e-2),
        ]
        if T == 1024:  # HYDRALM_DELTANET_COMPILE=1's path, on one shape (each shape compiles anew)
            variants.append(("triton+compile", torch.bfloat16, "high", 3e-2))
        only = os.environ.get("GPU_CHECK_DELTANET")  # e.g. "fused": check one backend's rows only
        for backend, dtype, precision, tol in variants:
            if only and backend not in only.split(","):
                continue
            torch.set_float32_matmul_precision(precision)
            kernel = compiled_delta_rule_chunkwise() if backend.endswith("+compile") else delta_rule_chunkwise
            _check_delta_rule_rows(
                f"delta_rule {backend} {dtype} {precision} T={T} D={D}",
                lambda *a, kernel=kernel, backend=backend: kernel(*a, chunk_size=C, backend=backend.split("+")[0])[0],
                ref_in, w, ref, ref_g, dtype, tol,
            )  # fmt: skip
        torch.set_float32_matmul_precision("highest")


def check_qk_norm(device: str) -> None:
    """The fused delta rule normalising raw q and k inside its kernels (qk_l2norm_eps), unpacked and on one packed
    head-last qkv tensor (`delta_rule_fused_packed`: the path of HYDRALM_DELTANET_PACKED=1), vs the fp64 chunkwise
    form on q, k normalised first, at the 160m layer's head size (B2 H12 T1024 D64, C 64: the blocked inverse);
    raw rows of norm far from 1. Output and the gradients of the raw q, k and of v, g, beta, fp32 IEEE / TF32 /
    bf16."""
    from hydralm.kernels.delta_rule.reference import l2_normalize
    from hydralm.kernels.delta_rule.triton_fused import delta_rule_fused_packed

    B, H, T, D, C, eps = 2, 12, 1024, 64, 64, 1e-6
    ref_in, w = _delta_rule_inputs(B, H, T, D, device, decay=0.5)
    ref_in[0] = (ref_in[0].detach() * 3.0).requires_grad_()
    ref_in[1] = (ref_in[1].detach() * 0.5).requires_grad_()

    def normalised_first(q, k, v, g, beta):
        return delta_rule_chunkwise(l2_normalize(q, eps), l2_normalize(k, eps), v, g, beta, chunk_size=C)[0]

    def unpacked(q, k, v, g, beta):
        return delta_rule_chunkwise(q, k, v, g, beta, chunk_size=C, backend="fused", qk_l2norm_eps=eps)[0]

    def packed(q, k, v, g, beta):  # q, k, v enter as head-last views of one tensor, as a layer holds them
        qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2)
        return delta_rule_fused_packed(qkv, g, beta, chunk_size=C, qk_l2norm_eps=eps)[0]

    ref, ref_g = _grads(normalised_first, ref_in, w)
    for dtype, precision, tol in (
        (torch.float32, "highest", 1e-4),
        (torch.float32, "high", 3e-3),
        (torch.bfloat16, "high", 3e-2),
    ):
        torch.set_float32_matmul_precision(precision)
        for name, fn in (("unpacked", unpacked), ("packed", packed)):
            label = f"qk_norm {name} {dtype} {precision} T={T} D={D}"
            _check_delta_rule_rows(label, fn, ref_in, w, ref, ref_g, dtype, tol)
    torch.set_float32_matmul_precision("highest")


def check_state_pass(device: str) -> None:
    """The fused delta rule at the 160m preset's 64k x 1 shape (H 12, D 64: 1024 chunks for 12 sequences), where
    the pass over chunks is cut into segments, against the fp64 PyTorch chunkwise kernel; the one-walk pass
    beside it, so the two errors can be compared."""
    from hydralm.kernels.delta_rule import triton_state_pass as sp

    B, H, T, D, C = 1, 12, 65536, 64, 64
    ref_in, w = _delta_rule_inputs(B, H, T, D, device, decay=0.1)
    torch.set_float32_matmul_precision("highest")
    ref, ref_g = _grads(lambda *a: delta_rule_chunkwise(*a, chunk_size=C, backend="torch")[0], ref_in, w)
    n = T // C
    print(f"      state_pass: {sp.segment_chunks(n, B * H)} chunks per segment by default", flush=True)
    for segments, seg in (("segmented", None), ("one walk", n)):
        sp.SEGMENT_CHUNKS = seg
        for dtype, precision, tol in ((torch.float32, "highest", 1e-4), (torch.float32, "high", 3e-3),
                                      (torch.bfloat16, "high", 3e-2)):  # fmt: skip
            torch.set_float32_matmul_precision(precision)
            _check_delta_rule_rows(
                f"state_pass {segments} {str(dtype)[6:]} {precision} T={T}",
                lambda *a: delta_rule_chunkwise(*a, chunk_size=C, backend="fused")[0],
                ref_in, w, ref, ref_g, dtype, tol,
            )  # fmt: skip
    sp.SEGMENT_CHUNKS = None
    torch.set_float32_matmul_precision("highest")


def check_fla(device: str) -> None:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as err:  # noqa: BLE001
        print(f"SKIP  fla not importable: {err!r}"[:200])
        return
    B, T, H, D = 2, 1024, 4, 128
    q = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    v, g = torch.randn(B, T, H, D, device=device), -torch.rand(B, T, H, device=device) * 0.5
    beta = torch.rand(B, T, H, device=device)
    s0 = torch.randn(B, H, D, D, device=device)
    ref, ref_s = delta_rule_chunkwise(
        *(t.transpose(1, 2).double() for t in (q, k, v, g, beta)), initial_state=s0.double()
    )
    with torch.no_grad():
        for dtype, tol in ((torch.float32, 3e-3), (torch.bfloat16, 3e-2)):  # fla computes in tf32 / bf16
            o, s = chunk_gated_delta_rule(
                q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype), initial_state=s0, output_final_state=True
            )
            _record(f"fla chunk_gated_delta_rule fwd {dtype} out", _rel(o.transpose(1, 2), ref), tol)
            _record(f"fla chunk_gated_delta_rule fwd {dtype} final state", _rel(s, ref_s), tol)


def check_flex(device: str) -> None:
    for N, W in ((2048, 512),):
        q, k, v = (
            torch.randn(2, 8, N, 64, device=device),
            torch.randn(2, 4, N, 64, device=device),
            torch.randn(2, 4, N, 64, device=device),
        )
        w = torch.randn(2, 8, N, 64, device=device)
        ref, ref_g = _grads(
            lambda a, b, c: sliding_window_attention(a, repeat_kv(b, 2), repeat_kv(c, 2), W),
            [t.clone().requires_grad_() for t in (q, k, v)],
            w,
        )
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            out, grads = _grads(
                lambda a, b, c: sliding_window_flex(a, b, c, W), [t.to(dtype).requires_grad_() for t in (q, k, v)], w
            )
            _record(f"flex SWA {dtype} N={N} W={W} out", _rel(out, ref), tol)
            for name, ga, gb in zip("qkv", grads, ref_g):
                _record(f"flex SWA {dtype} N={N} W={W} d{name}", _rel(ga, gb), tol * 2)
    for N, C, K, coherent in ((1024, 64, 4, False), (1024, 128, 2, True)):
        q, k, v = (torch.randn(1, 4, N, 64, device=device) for _ in range(3))
        if coherent:  # a tile's queries route alike, so most visited tiles are full blocks
            q = coherent_queries(q)
        w = torch.randn(1, 4, N, 64, device=device)
        ref, ref_g = _grads(
            lambda a, b, c: _reference_on_device(a, b, c, C, K), [t.clone().requires_grad_() for t in (q, k, v)], w
        )
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            out, grads = _grads(
                lambda a, b, c: retrieval_flex(a, b, c, C, K), [t.to(dtype).requires_grad_() for t in (q, k, v)], w
            )
            name = f"flex retrieval {dtype} N={N} C={C} k={K}{' coherent q' if coherent else ''}"
            _record(f"{name} out", _rel(out, ref), tol)
            for grad_name, ga, gb in zip("qkv", grads, ref_g):
                _record(f"{name} d{grad_name}", _rel(ga, gb), tol * 2)


def _reference_on_device(q, k, v, C, K):
    """The module's gather path (equal to the dense-mask reference in the CPU tests), differentiable."""
    from hydralm.config import HydraConfig
    from hydralm.modules.retrieval_attention import RetrievalAttention

    layer = RetrievalAttention(
        HydraConfig(
            vocab_size=8,
            d_model=q.shape[1] * q.shape[-1],
            n_layers=1,
            n_heads=q.shape[1],
            layer_types=["retrieval"],
            retrieval_chunk_size=C,
            retrieval_top_k=K,
        )
    ).to(q.device)
    with _env("HYDRALM_ATTENTION", "torch"):
        return layer.attend(q, k, v)[0]


def check_retrieval(device: str) -> None:
    """The Triton retrieval kernel (kernels/retrieval/triton_sparse.py) against an fp64 reference given the same
    routing (routing is compared on its own first: two paths whose fp32 scores differ in the last bit may pick
    different chunks at near-ties, which would dominate the error), outputs and all gradients, in fp32 (IEEE
    and TF32) and bf16, random and coherent routing; then bit-for-bit reproducibility and row independence."""
    from hydralm.kernels.retrieval.routing import chunk_summaries, route_tokens_blocked
    from hydralm.kernels.retrieval.triton_sparse import retrieval_attention_triton

    torch.set_float32_matmul_precision("highest")
    # routing: integer queries and keys score exactly, with many ties: the blocked PyTorch router and the Triton
    # router both keep the lowest id, as route_tokens does; random ones may differ at near-ties only
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randint(-1, 2, (2, 4, 4096, 64), device=device).to(dtype)
        k = torch.randint(-1, 2, (2, 2, 4096, 64), device=device).to(dtype)
        for router, (got, expected) in _routings(q, k, 64, 8).items():
            _record(
                f"retrieval {router} {dtype} ties forced: fraction of tokens routed differently",
                _differ(got, expected),
                0,
            )
    q, k = torch.randn(2, 4, 8192, 64, device=device), torch.randn(2, 2, 8192, 64, device=device)
    for router, (got, expected) in _routings(q, k, 64, 8).items():
        _record(f"retrieval {router} fp32 random: fraction of tokens routed differently", _differ(got, expected), 1e-3)

    # (B, H, H_kv, N, D, C, top_k, coherent): GQA and MHA, ragged N, N up to 8k, D 64 and 128
    # each new (D, C, top_k) compiles and autotunes the kernels anew (about a minute on an H200): few of them
    shapes = [
        (2, 4, 2, 2048, 64, 64, 8, False),
        (3, 4, 4, 3000, 64, 32, 4, False),
        (2, 2, 1, 1024, 128, 128, 2, True),
        (2, 4, 2, 8192, 64, 64, 8, True),
    ]
    variants = [(torch.float32, "highest", 1e-4), (torch.float32, "high", 3e-3), (torch.bfloat16, "high", 2e-2)]
    shapes = shapes[: int(os.environ.get("GPU_CHECK_RETRIEVAL_SHAPES", len(shapes)))]  # a quicker check: the first n
    for B, H, H_kv, N, D, C, K, coherent in shapes:
        q = torch.randn(B, H, N, D, device=device)
        if coherent:  # a tile's queries route alike
            q = coherent_queries(q)
        k, v = torch.randn(B, H_kv, N, D, device=device), torch.randn(B, H_kv, N, D, device=device)
        w = torch.randn(B, H, N, D, device=device)
        selected = route_tokens_blocked(q, chunk_summaries(k, C), C, K)
        ref, ref_g = _grads(
            lambda a, b, c: _retrieval_given_routing(a, b, c, selected, C),
            [t.double().requires_grad_() for t in (q, k, v)],
            w.double(),
        )
        for dtype, precision, tol in variants:
            torch.set_float32_matmul_precision(precision)
            out, grads = _grads(
                lambda a, b, c: retrieval_attention_triton(a, b, c, C, K, selected=selected),
                [t.to(dtype).requires_grad_() for t in (q, k, v)],
                w,
            )
            name = f"retrieval triton {dtype} {precision} B{B} H{H}/{H_kv} N{N} D{D} C{C} k{K}"
            name += " coherent q" if coherent else ""
            _record(f"{name} out", _rel(out, ref), tol)
            for grad_name, ga, gb in zip("qkv", grads, ref_g):
                _record(f"{name} d{grad_name}", _rel(ga, gb), tol * 3)
    torch.set_float32_matmul_precision("highest")

    # deterministic gradients (no atomics) and rows of a batch independent (C2), bit for bit
    B, H, H_kv, N, D, C, K = 3, 4, 2, 4096, 64, 64, 8
    inputs = [torch.randn(B, h, N, D, device=device, dtype=torch.bfloat16) for h in (H, H_kv, H_kv)]
    w = torch.randn(B, H, N, D, device=device)
    changed = [t.clone() for t in inputs]
    for t in changed:
        t[1:] = torch.randn_like(t[1:])

    def run(tensors):
        leaves = [t.clone().requires_grad_() for t in tensors]
        return _grads(lambda a, b, c: retrieval_attention_triton(a, b, c, C, K), leaves, w)

    (out0, g0), (out1, g1), (out2, g2) = run(inputs), run(inputs), run(changed)
    repeat = max(float((a != b).float().mean()) for a, b in zip([out0, *g0], [out1, *g1]))
    _record("retrieval triton bf16 fwd+bwd twice: fraction of elements differing", repeat, 0)
    row0 = max(float((a[0] != b[0]).float().mean()) for a, b in zip([out0, *g0], [out2, *g2]))
    _record("retrieval triton bf16 row 0 with rows 1-2 changed: fraction differing (C2)", row0, 0)


@torch.no_grad()
def check_retrieval_stream(device: str, d_model: int = 768, heads: tuple = (12, 4), tokens: int = 16384) -> None:
    """Calls with a state on the kernels (the forward from sources: exact and compressed picks, the bank's last
    chunk as local context) vs the gather path (HYDRALM_RETRIEVAL=torch): one retrieval layer at the 160m width
    with compressive memory, streamed in uneven pieces (chunk in progress, compression, eviction), fp32 IEEE and
    bf16. Both paths route with the same code, so only the attention's arithmetic differs."""
    from hydralm import HydraConfig, HydraLM

    torch.set_float32_matmul_precision("highest")
    cfg = HydraConfig(
        vocab_size=512,
        d_model=d_model,
        n_layers=1,
        n_heads=heads[0],
        n_kv_heads=heads[1],
        layer_types=["retrieval"],
        retrieval_chunk_size=64,
        retrieval_top_k=8,
        memory=dict(exact_window=1024, compress_every=8, pool_size=1024),
    )
    ids = torch.randint(0, cfg.vocab_size, (2, tokens), device=device)
    cuts = sorted({0, tokens // 4, tokens // 4 + 1000, tokens // 2 + 7, tokens})
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        torch.manual_seed(0)
        model = HydraLM(cfg).to(device=device, dtype=dtype).eval()
        logits = {}
        for backend in ("torch", "triton"):
            with _env("HYDRALM_RETRIEVAL", backend):
                state, pieces = None, []
                for a, b in zip(cuts, cuts[1:]):
                    out = model(ids[:, a:b], state=state, return_state=True)
                    state = out["state"]
                    pieces.append(out["logits"].float())
            logits[backend] = torch.cat(pieces, dim=1)
        _record(f"retrieval stream {dtype} pieces {cuts}: kernels vs gather path logits", _rel(*logits.values()), tol)


def _routings(q, k, C, K) -> dict:
    """{router: (its selections, route_tokens' in one call)} for the blocked PyTorch and the Triton routers, as
    (B, H, N, K) int32 with -1 = none."""
    from hydralm.kernels.retrieval.routing import chunk_summaries, route_tokens, route_tokens_blocked
    from hydralm.kernels.retrieval.triton_routing import route_tokens_triton

    N = q.shape[2]
    summaries = chunk_summaries(k, C)
    n_eligible = (torch.arange(N, device=q.device) // C - 1).clamp(min=0)
    selected, valid = route_tokens(q, [summaries], n_eligible, K)
    expected = torch.where(valid, selected, -1).to(torch.int32)
    return {
        "route_tokens_blocked": (route_tokens_blocked(q, summaries, C, K, block=1000), expected),
        "route_tokens_triton": (route_tokens_triton(q, summaries, C, K), expected),
    }


def _differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a != b).any(-1).float().mean())


def _retrieval_given_routing(q, k, v, selected, C, block=512):
    """Retrieval attention for a given routing, dense per block of queries (fp64 in, fp64 out): token t reads
    chunk t // C - 1, its own chunk up to t and the chunks `selected` lists (-1 = none), in one softmax."""
    B, H, N, D = q.shape
    k, v = repeat_kv(k, H // k.shape[1]), repeat_kv(v, H // v.shape[1])
    key = torch.arange(N, device=q.device)
    n_chunks = N // C
    outs = []
    for a in range(0, N, block):
        t = key[a : a + block]
        ids = torch.where(selected[:, :, a : a + block] >= 0, selected[:, :, a : a + block], n_chunks + 1).long()
        chosen = torch.zeros(*ids.shape[:-1], n_chunks + 2, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, ids, True)  # keys of the partial last chunk (id n_chunks) are never chosen
        local = (key[None, :] <= t[:, None]) & (key[None, :] // C >= t[:, None] // C - 1)
        allowed = chosen[..., key // C] | local
        scores = (q[:, :, a : a + block] @ k.transpose(-1, -2)) * D**-0.5
        outs.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v)
    return torch.cat(outs, dim=2)


@torch.no_grad()
def _decode_model(device: str, **overrides):
    """The decode checks' model: every layer type, GQA and compressive memory small enough that 150 steps go through
    chunk completion, compression, eviction and the SWA ring's wrap."""
    from hydralm import HydraConfig, HydraLM

    cfg = HydraConfig(
        vocab_size=256,
        d_model=128,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        layer_types=["deltanet", "swa", "retrieval"],
        swa_window=32,
        retrieval_chunk_size=16,
        retrieval_top_k=2,
        memory=dict(exact_window=32, compress_every=4, pool_size=16),
        **overrides,
    )
    return HydraLM(cfg).to(device).eval()


def check_static_decode(device: str) -> None:
    """StaticDecoder eager and as a CUDA graph (compile_mode="reduce-overhead") vs model.step, fp32, 150 steps
    through chunk completion, compression, eviction and the SWA ring's wrap. The decoder runs on the switches
    given (HYDRALM_DECODE=fused: the fused Gated DeltaNet step; HYDRALM_RETRIEVAL_DECODE=triton: the retrieval
    step's kernel; HYDRALM_SWA_DECODE=triton: the SWA step's); model.step, the reference, on the PyTorch steps."""
    from hydralm import StaticDecoder
    from hydralm.state import clone_state

    torch.backends.cuda.matmul.allow_tf32 = False
    decode, retrieval = os.environ.get("HYDRALM_DECODE"), os.environ.get("HYDRALM_RETRIEVAL_DECODE")
    swa = os.environ.get("HYDRALM_SWA_DECODE")
    model = _decode_model(device)
    out = model(torch.randint(0, 256, (2, 40), device=device), return_state=True)
    for name, kwargs in (("eager", {}), ("CUDA graph", dict(compile=True, compile_mode="reduce-overhead"))):
        decoder, state = StaticDecoder(model, out["state"], **kwargs), clone_state(out["state"])
        token, worst, scale = out["logits"][:, -1].argmax(-1), 0.0, 0.0
        for _ in range(150):
            with _env("HYDRALM_DECODE", "torch"), _env("HYDRALM_RETRIEVAL_DECODE", "torch"):
                with _env("HYDRALM_SWA_DECODE", "torch"):
                    expected, state = model.step(token, state)
            with _env("HYDRALM_DECODE", decode), _env("HYDRALM_RETRIEVAL_DECODE", retrieval):
                with _env("HYDRALM_SWA_DECODE", swa):
                    got = decoder.step(token)
            worst, scale = max(worst, float((got - expected).abs().max())), max(scale, float(expected.abs().max()))
            token = expected.argmax(-1)
        parts = (("fused GDN step", decode == "fused"), ("retrieval kernel", retrieval == "triton"))
        parts += (("SWA kernel", swa == "triton"),)
        kernels = ", ".join(part for part, on in parts if on)
        label = f"StaticDecoder {name}{f' ({kernels})' if kernels else ''} logits vs model.step"
        _record(f"{label} (max abs / max |logit|)", worst / scale, 1e-4)


@torch.no_grad()
def check_decode_fused(device: str) -> None:
    """The fused Gated DeltaNet decode step (HYDRALM_DECODE=fused) vs the PyTorch step on one 160m-sized layer
    (d 768, H 12, D 64), batch 4, 64 tokens from a random state, fp32 (IEEE matmuls) and bf16."""
    from hydralm import HydraConfig
    from hydralm.modules.gated_deltanet import GatedDeltaNet

    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        layer = GatedDeltaNet(HydraConfig(d_model=768, n_heads=12, vocab_size=256)).to(device, dtype)
        state = layer.init_state(4, device=device, dtype=dtype)
        state.S.normal_()
        state.conv.normal_()
        xs = torch.randn(64, 4, 768, device=device, dtype=dtype)
        results = {}
        for backend in ("torch", "fused"):
            with _env("HYDRALM_DECODE", backend):
                s, ys = state, []
                for x_t in xs:
                    y, s = layer.step(x_t, s)
                    ys.append(y)
            results[backend] = (torch.stack(ys), s.S)
        for i, part in enumerate(("outputs", "state")):
            _record(f"fused GDN step vs PyTorch step, {str(dtype)[6:]} 64 tokens: {part}",
                    _rel(results["fused"][i], results["torch"][i]), tol)  # fmt: skip


@torch.no_grad()
def check_retrieval_decode(device: str) -> None:
    """The retrieval decode step's kernel (HYDRALM_RETRIEVAL_DECODE=triton) vs the PyTorch step: one 160m-sized
    retrieval layer (d 768, H 12, C 64, top-8) with the streaming model's memory, batch 4, 64 steps after a
    6000-token read (exact and pooled chunks held), fp32 (IEEE matmuls) and bf16 logits."""
    from benchmarks.speed import DECODE_MEMORY
    from hydralm import HydraConfig, HydraLM

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = HydraConfig(
        d_model=768, n_heads=12, n_layers=1, layer_types=["retrieval"], vocab_size=256, memory=DECODE_MEMORY
    )
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        model = HydraLM(cfg).to(device, dtype).eval()
        logits = _step_logits_per_backend(model, "HYDRALM_RETRIEVAL_DECODE", read=6000, steps=64, device=device)
        _record(f"retrieval step kernel vs PyTorch step, {str(dtype)[6:]} 64 tokens: logits",
                _rel(logits["triton"], logits["torch"]), tol)  # fmt: skip


def _step_logits_per_backend(model, switch: str, read: int, steps: int, device: str) -> dict:
    """{backend: (steps, 4, vocab) logits} of `steps` decode steps after a `read`-token forward, batch 4, with the
    step switch `switch` set to torch and to triton (the same tokens and start state for both)."""
    from hydralm.state import clone_state

    ids = torch.randint(0, 256, (4, read + steps), device=device)
    start = model(ids[:, :read], return_state=True)["state"]
    logits = {}
    for backend in ("torch", "triton"):
        with _env(switch, backend):
            state, outs = clone_state(start), []
            for t in range(read, read + steps):
                out, state = model.step(ids[:, t], state)
                outs.append(out)
        logits[backend] = torch.stack(outs)
    return logits


@torch.no_grad()
def check_swa_decode(device: str) -> None:
    """The sliding-window decode step's kernel (HYDRALM_SWA_DECODE=triton) vs the PyTorch step: one 160m-sized SWA
    layer (d 768, H 12 on 12 key heads as the preset, and on 4 for GQA; window 512), batch 4, 64 steps after a
    480-token read (the ring fills at the 32nd step, then wraps), fp32 (IEEE matmuls) and bf16 logits."""
    from hydralm import HydraConfig, HydraLM

    torch.backends.cuda.matmul.allow_tf32 = False
    for kv_heads in (12, 4):
        fields = dict(n_layers=1, layer_types=["swa"], vocab_size=256, swa_window=512)
        cfg = HydraConfig(d_model=768, n_heads=12, n_kv_heads=kv_heads, **fields)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            model = HydraLM(cfg).to(device, dtype).eval()
            logits = _step_logits_per_backend(model, "HYDRALM_SWA_DECODE", read=480, steps=64, device=device)
            _record(f"SWA step kernel vs PyTorch step, H 12/{kv_heads}, {str(dtype)[6:]} 64 tokens: logits",
                    _rel(logits["triton"], logits["torch"]), tol)  # fmt: skip


@torch.no_grad()
def check_decode_linear(device: str) -> None:
    """The decode GEMV (HYDRALM_DECODE_LINEAR=gemv) vs F.linear on the 160m model's projection shapes (N x K) and
    the LM head's, 1, 3 and 16 rows, fp32 (IEEE matmuls) and bf16; and each row of a several-row call against
    the one-row call of that row (bit-identical)."""
    from hydralm.kernels.linear.triton_gemv import gemv

    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = ((3096, 768), (4096, 768), (768, 2048), (768, 768), (32000, 768))  # DeltaNet in, MLP up, down, out, head
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        worst, differing_rows = 0.0, 0
        for N, K in shapes:
            weight = torch.randn(N, K, device=device, dtype=dtype)
            for rows in (1, 3, 16):
                x = torch.randn(rows, K, device=device, dtype=dtype)
                y = gemv(x, weight)
                worst = max(worst, _rel(y, F.linear(x.double(), weight.double())))
                # rows are exact: each row of a several-row call is the one-row call's output, bit for bit
                differing_rows += sum(not torch.equal(y[i], gemv(x[i : i + 1], weight)[0]) for i in range(rows))
        _record(f"decode GEMV vs F.linear (fp64), {str(dtype)[6:]}, 160m shapes, 1/3/16 rows", worst, tol)
        _record(f"decode GEMV rows unlike one-row calls, {str(dtype)[6:]}", differing_rows, 0, measure="rows")
        _check_folded_gemv(device, dtype, tol)


def _check_folded_gemv(device: str, dtype: torch.dtype, tol: float) -> None:
    """The GEMV with a block's ops folded in (HYDRALM_DECODE_LINEAR=fused) vs those ops then F.linear in fp64, at
    the 160m shapes: the norm before the DeltaNet and MLP input projections, the residual after the output
    projection, SwiGLU's product and the residual around the down projection; 1 and 3 rows, each row of the
    3-row call bit-identical to its one-row call."""
    from hydralm.kernels.linear.triton_gemv import gemv
    from hydralm.modules.rmsnorm import RMSNorm

    worst, differing_rows = 0.0, 0
    for (N, K), fold in (
        ((3096, 768), "norm"),
        ((4096, 768), "norm"),
        ((768, 768), "residual"),
        ((768, 2048), "swiglu"),
    ):
        weight = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
        for rows in (1, 3):
            x = torch.randn(rows, 2 * K if fold == "swiglu" else K, device=device, dtype=dtype)
            residual = torch.randn(rows, N, device=device, dtype=dtype)
            norm_weight = 1 + 0.1 * torch.randn(K, device=device, dtype=dtype)
            xd = x.double()
            if fold == "norm":
                args = dict(norm_weight=norm_weight, eps=1e-5)
                norm = RMSNorm(K, eps=1e-5).to(device, torch.float64)
                norm.weight.data.copy_(norm_weight)
                expected = F.linear(norm.reference(xd), weight.double())
            elif fold == "residual":
                args = dict(residual=residual)
                expected = residual.double() + F.linear(xd, weight.double())
            else:
                args = dict(residual=residual, swiglu=True)
                gate, up = xd.chunk(2, dim=-1)
                expected = residual.double() + F.linear(F.silu(gate) * up, weight.double())
            y = gemv(x, weight, **args)
            worst = max(worst, _rel(y, expected))
            for i in range(rows):
                one = {k: (v[i : i + 1] if k == "residual" else v) for k, v in args.items()}
                differing_rows += not torch.equal(y[i], gemv(x[i : i + 1], weight, **one)[0])
    name = str(dtype)[6:]
    _record(f"decode GEMV, norm / SwiGLU / residual folded, vs fp64, {name}, 160m shapes", worst, tol)
    _record(f"decode GEMV folded, rows unlike one-row calls, {name}", differing_rows, 0, measure="rows")


def check_cross_entropy(device: str) -> None:
    """The fused linear + cross-entropy kernels HYDRALM_CROSS_ENTROPY can pick (our chunks with Triton softmax
    kernels; fla's, liger-kernel's where they import) vs the full-logits reference in fp64: loss and the
    gradients of hidden and weight, fp32 and bf16 inputs, a tenth of the rows ignored; and a batch whose rows
    are all ignored (the loss must be 0, gradients finite). At the 160m head: d 768, V 32000, 4096 rows."""
    import importlib

    from hydralm.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    torch.backends.cuda.matmul.allow_tf32 = False
    N, d, V = 4096, 768, 32000
    for name, module in (
        ("triton", None),
        ("fla", "fla.modules.fused_linear_cross_entropy"),
        ("liger", "liger_kernel.transformers.functional"),
    ):
        try:
            if module:
                importlib.import_module(module)
        except Exception as err:  # not installed here
            print(f"SKIP  cross_entropy {name}: {module} does not import ({type(err).__name__})", flush=True)
            continue
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            hidden = torch.randn(N, d, device=device, dtype=dtype).requires_grad_()
            weight = (0.02 * torch.randn(V, d, device=device, dtype=dtype)).requires_grad_()
            labels = torch.randint(0, V, (N,), device=device)
            labels[torch.rand(N, device=device) < 0.1] = -100
            with _env("HYDRALM_CROSS_ENTROPY", name):
                loss = linear_cross_entropy(hidden, weight, labels)
                got = (loss, *torch.autograd.grad(loss, (hidden, weight)))
            h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
            ref_loss = linear_cross_entropy_reference(h64, w64, labels)
            expected = (ref_loss, *torch.autograd.grad(ref_loss, (h64, w64)))
            for part, a, b in zip(("loss", "d hidden", "d weight"), got, expected):
                _record(f"cross_entropy {name} {str(dtype)[6:]} {part}", _rel(a, b), tol)
        hidden = torch.randn(64, d, device=device).requires_grad_()
        with _env("HYDRALM_CROSS_ENTROPY", name):
            loss = linear_cross_entropy(hidden, weight.detach().float(), torch.full((64,), -100, device=device))
            (grad,) = torch.autograd.grad(loss, (hidden,))
        bad = float(loss.abs()) if bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all()) else float("inf")
        _record(f"cross_entropy {name} all rows ignored: |loss|, finite", bad, 0.0, "abs")


def check_rmsnorm(device: str) -> None:
    """The Triton RMSNorm (kernels/norm/triton_rmsnorm.py) vs the plain expression in fp64: output, dx and
    dweight, for fp32 and bf16 inputs and an fp32 input under bf16 autocast (backward then keeps a bf16 copy of
    x, as the PyTorch form does), at the 160m width over 8192 rows and at a ragged 3000 x 100."""
    from hydralm.kernels.norm.triton_rmsnorm import rms_norm_triton

    for rows, width in ((8192, 768), (3000, 100)):
        variants = ((torch.float32, False, 1e-5), (torch.bfloat16, False, 1e-2), (torch.float32, True, 1e-2))
        for dtype, autocast, tol in variants:
            x = (torch.randn(rows, width, device=device) * 3 + 0.5).to(dtype).requires_grad_()
            weight = (torch.rand(width, device=device) + 0.5).requires_grad_()
            dy = torch.randn(rows, width, device=device)
            kept = torch.bfloat16 if autocast else None
            y = rms_norm_triton(x, weight, 1e-5, kept_dtype=kept)
            got = (y, *torch.autograd.grad(y, (x, weight), dy.to(y.dtype)))
            x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
            x_in = x64.to(kept).double() if autocast else x64  # what backward sees of x
            ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
            ref_grads = torch.autograd.grad(
                x_in * torch.rsqrt(x_in.pow(2).mean(-1, keepdim=True) + 1e-5) * w64, (x64, w64), dy.double()
            )
            label = f"rmsnorm triton {str(dtype)[6:]}{' autocast' if autocast else ''} {rows}x{width}"
            for part, a, b in zip(("out", "dx", "dweight"), got, (ref, *ref_grads)):
                _record(f"{label} {part}", _rel(a, b), tol)


def check_swiglu(device: str) -> None:
    """The Triton SwiGLU (kernels/activation/triton_swiglu.py) vs the plain expression F.linear(silu(gate) * up,
    weight) in fp64: output, grad of the gate_up output h and grad of the down weight, for fp32 and for a bf16 h
    under bf16 autocast (an fp32 weight, as in training), at the 160m's hidden 2048 over 64k rows (d_model 768)
    and at a ragged 3001 x 1000. fp32 with IEEE matmuls; a result in the wrong dtype fails its row."""
    from hydralm.kernels.activation.triton_swiglu import swiglu_down_triton

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    d_model = 768
    try:
        for rows, hidden in ((65536, 2048), (3001, 1000)):
            for autocast, tol in ((False, 1e-5), (True, 1e-2)):
                dtype = torch.bfloat16 if autocast else torch.float32
                h = (2 * torch.randn(rows, 2 * hidden, device=device)).to(dtype).requires_grad_()
                weight = (torch.randn(d_model, hidden, device=device) / hidden**0.5).requires_grad_()
                dy = torch.randn(rows, d_model, device=device).to(dtype)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    out = swiglu_down_triton(h, weight)
                got = (out.detach(), *torch.autograd.grad(out, (h, weight), dy))
                h64, w64 = (t.detach().double().requires_grad_() for t in (h, weight))
                gate, up = h64.chunk(2, dim=-1)
                ref = F.linear(F.silu(gate) * up, w64)
                expected = (ref, *torch.autograd.grad(ref, (h64, w64), dy.double()))
                label = f"swiglu triton {'bf16 autocast' if autocast else 'float32'} {rows}x{hidden}"
                dtypes = (dtype, dtype, weight.dtype)  # those of the output and of h's and the weight's gradients
                for part, a, b, want in zip(("out", "grad h", "grad weight"), got, expected, dtypes):
                    _record(f"{label} {part}", _rel(a, b) if a.dtype == want else float("inf"), tol)
                del h, weight, out, got, h64, w64, ref, expected
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def check_rotary(device: str) -> None:
    """The Triton rotary embedding (kernels/rotary/triton_rotary.py) vs the module's rotate-half expression in
    fp64 on the same fp32 cos / sin tables: output and grad of x, for fp32 and bf16 x that is a strided view of
    one (B, N, 3, H, D) qkv tensor, as the attention layers pass q and k, at the 160m's B1 H12 N65536 D64
    (positions from 0) and at a ragged B2 H3 N3001 D128 (positions from 1000). A result in the wrong dtype fails
    its row."""
    from hydralm.kernels.rotary.triton_rotary import rotary_triton
    from hydralm.modules.rotary import Rotary

    for B, H, N, D, start in ((1, 12, 65536, 64, 0), (2, 3, 3001, 128, 1000)):
        rotary = Rotary(D).to(device)
        angles = torch.arange(start, start + N, device=device).float()[:, None] * rotary.inv_freq
        cos, sin = angles.cos(), angles.sin()
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype).requires_grad_()
            x = qkv.unbind(2)[0].transpose(1, 2)  # (B, H, N, D), last dim contiguous only
            dy = torch.randn(B, H, N, D, device=device).to(dtype)
            out = rotary_triton(x, cos, sin)
            (grad_x,) = torch.autograd.grad(out, (x,), dy)
            x64 = x.detach().double().requires_grad_()
            half = D // 2
            rotated = torch.cat([-x64[..., half:], x64[..., :half]], dim=-1)
            ref = x64 * torch.cat([cos, cos], dim=-1).double() + rotated * torch.cat([sin, sin], dim=-1).double()
            expected = (ref.detach(), *torch.autograd.grad(ref, (x64,), dy.double()))
            label = f"rotary triton {str(dtype)[6:]} B{B} H{H} N{N} D{D}"
            for part, a, b in zip(("out", "grad x"), (out.detach(), grad_x), expected):
                _record(f"{label} {part}", _rel(a, b) if a.dtype == dtype else float("inf"), tol)
            del qkv, x, out, grad_x, x64, rotated, ref, expected


def check_short_conv(device: str) -> None:
    """The Triton short conv (kernels/conv/triton_short_conv.py) vs the plain expression silu(conv1d(zero-padded x))
    in fp64: output, grad x and grad weight, for fp32 x and a bf16 x (an fp32 weight, as in training), x a strided
    slice of a wider tensor as the block passes it, at the 160m block's 64k tokens x 2304 channels (q, k, v) and
    at a ragged B2 N3001 C1000 with kernel size 3; and the forward after a carried cache (streaming, chunked
    prefill). A result in the wrong dtype fails its row."""
    from hydralm.kernels.conv.triton_short_conv import short_conv_forward, short_conv_triton

    for B, N, C, K in ((1, 65536, 2304, 4), (2, 3001, 1000, 3)):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            wide = torch.randn(B, N, C + 40, device=device).to(dtype).requires_grad_()
            x = wide[..., 8 : 8 + C]
            weight = (torch.randn(C, 1, K, device=device) / K**0.5).requires_grad_()
            dy = torch.randn(B, N, C, device=device).to(dtype)
            out = short_conv_triton(x, weight)
            got = (out.detach(), *torch.autograd.grad(out, (x, weight), dy))
            x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
            padded = F.pad(x64, (0, 0, K - 1, 0)).transpose(1, 2)
            ref = F.silu(F.conv1d(padded, w64, groups=C).transpose(1, 2))
            expected = (ref.detach(), *torch.autograd.grad(ref, (x64, w64), dy.double()))
            label = f"short_conv triton {str(dtype)[6:]} B{B} N{N} C{C} K{K}"
            for part, a, b, want in zip(("out", "grad x", "grad weight"), got, expected, (dtype, dtype, torch.float32)):
                _record(f"{label} {part}", _rel(a, b) if a.dtype == want else float("inf"), tol)
            cache = torch.randn(B, K - 1, C, device=device).to(dtype)  # a stream's previous inputs
            with torch.no_grad():
                streamed = short_conv_forward(x, weight, cache)
                full = torch.cat([cache.double(), x64.detach()], dim=1).transpose(1, 2)
                ref = F.silu(F.conv1d(full, w64.detach(), groups=C).transpose(1, 2))
            _record(f"{label} out after a cache", _rel(streamed, ref) if streamed.dtype == dtype else float("inf"), tol)
            del wide, x, out, got, x64, w64, padded, ref, expected, cache, streamed, full


@torch.no_grad()
def check_exactness(device: str) -> None:
    """Claims C1 and C2 on the GPU's default paths (HYDRALM_* = auto), fp32 with IEEE matmuls: parallel forward vs
    chunked prefill vs step, at 2048 tokens (deltanet/swa/retrieval, 64-token chunks), with compressive memory (its
    chunked calls read compressed chunks: the kernels' forward from sources) and for the full budget's
    20-layer model; retrieval picks that differ between the paths (routing near-ties); batch row 0 bit-identical
    when the other rows change; greedy speculative decoding with memory = greedy generate."""
    from hydralm import HydraConfig, HydraLM
    from hydralm.eval.claims import (
        BUDGETS,
        LONG_C1_MODEL,
        c1_bound,
        c1_max_diff,
        equivalence_configs,
        random_splits,
        speculative_mismatches,
    )

    torch.set_float32_matmul_precision("highest")
    gen = torch.Generator().manual_seed(0)
    configs = equivalence_configs(BUDGETS["full"]["c1"])
    for name, cfg, N in (
        ("long", HydraConfig(**LONG_C1_MODEL), 2048),
        ("memory+gqa", configs["memory+gqa"], 512),
        ("mixed-20-layer", configs["mixed-20-layer"], 300),
    ):
        torch.manual_seed(0)
        model = HydraLM(cfg).to(device).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, N), generator=gen).to(device)
        c1 = c1_max_diff(model, ids, random_splits(N, gen))
        bound = c1_bound(c1["max_abs_logit"])
        _record(f"C1 {name} N{N}: parallel / chunked / step logits", c1["max_abs_diff"], bound, "max abs")
        _record(
            f"C1 {name} N{N}: retrieval picks parallel vs step", float(c1["routing_picks_differing"]), 0.0, "differing"
        )
        ids = torch.full((3, N), 7, device=device)
        other = ids.clone()
        other[1:] = torch.randint(0, cfg.vocab_size, (2, N), generator=gen).to(device)
        diff = float((model(ids)["logits"][0] - model(other)["logits"][0]).abs().max())
        sa, sb = model.init_state(3), model.init_state(3)
        for t in range(min(N, 256)):
            la, sa = model.step(ids[:, t], sa)
            lb, sb = model.step(other[:, t], sb)
            diff = max(diff, float((la[0] - lb[0]).abs().max()))
        _record(f"C2 {name} N{N}: row 0 when the other rows change", diff, 0.0, "max abs")
    differing = speculative_mismatches(8, gen, device)
    _record("C1 greedy speculative (memory) vs generate: tokens differing", float(differing), 0.0, "count")


def check_spec_decode(device: str) -> None:
    """Speculative decoding on CUDA graphs, fp32: the StaticDecoder's verify (3 tokens) and commit (a random kept
    prefix) captured as graphs vs decode steps over 60 rounds, through chunk completion, compression, eviction
    and the SWA ring's wrap; its MTP draft step vs the eager module; greedy self-draft with decoder="graph" vs
    greedy generate with decoder="step" (identical tokens)."""
    from hydralm import StaticDecoder, generate, speculative_generate

    torch.backends.cuda.matmul.allow_tf32 = False
    model = _decode_model(device, mtp_depth=2, initializer_range=0.1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 40), device=device), return_state=True, return_hidden=True)
        decoder = StaticDecoder(model, out["state"], compile=True, compile_mode="reduce-overhead")
        state, worst, scale, state_gap = out["state"], 0.0, 0.0, 0.0
        for _ in range(60):
            ids = torch.randint(0, 256, (1, 3), generator=gen).to(device)
            kept = int(torch.randint(1, 4, (1,), generator=gen))
            logits = decoder.verify(ids)[0].clone()
            stepped, kept_state = state, None
            for t in range(3):
                expected, stepped, _ = model.decode_step(ids[:, t], stepped)
                worst = max(worst, float((logits[:, t] - expected).abs().max()))
                scale = max(scale, float(expected.abs().max()))
                kept_state = stepped if t + 1 == kept else kept_state
            decoder.commit(kept)
            state = kept_state
            for mine, ref in zip(decoder.state, state):
                for name, value in ref.contents().items():
                    if torch.is_tensor(value) and value.numel():
                        state_gap = max(state_gap, float((mine.contents()[name] - value).abs().max()))
        _record("StaticDecoder verify graph logits vs decode steps (max abs / max |logit|)", worst / scale, 1e-4)
        _record("StaticDecoder commit graph state vs decode steps (max abs)", state_gap, 1e-4)
        hidden, token = out["hidden"][:, -1], out["logits"][:, -1].argmax(-1)
        eager = model.mtp.draft_step(1, hidden, token, model.embed, model.lm_head)[1]
        gap = float((decoder.mtp_step(1, hidden, token)[1] - eager).abs().max())
        _record("StaticDecoder mtp_step graph vs MTPHead.draft_step (max abs)", gap, 1e-4)
    prompt = torch.randint(0, 256, (1, 50), generator=gen).to(device)
    plain = generate(model, prompt, 120, temperature=0, decoder="step")
    spec, stats = speculative_generate(model, None, prompt, 120, k=2, temperature=0, decoder="graph")
    print(f"      self-draft on graphs: {stats.to_dict()}", flush=True)
    _record("speculative_generate(decoder='graph') greedy == generate greedy", float(not torch.equal(plain, spec)), 0)


def check_gdn_block(device: str) -> None:
    """The 160m preset's Gated DeltaNet block with fla's short conv, L2 norm and gated RMSNorm
    (HYDRALM_GDN_MODULES=fla, kernels/fla_modules.py) vs its PyTorch modules in fp32 (the reference), same
    weights: output, final state, gradients of the input and of every parameter, fp32 and bf16 autocast. The torch
    modules under bf16 autocast are recorded too, as the error bf16 itself costs. The delta rule runs its PyTorch
    kernel in every variant (it is the same op on both sides, and skips our kernels' compiles); most of the time
    left is fla's first-call autotuning. GPU_CHECK_GDN_BLOCK=fla-fp32,fla-bf16,torch-bf16 picks the variants."""
    import time

    from hydralm.config import HydraConfig
    from hydralm.kernels.backend import fla_modules_available
    from hydralm.modules.gated_deltanet import GatedDeltaNet

    if not fla_modules_available():
        print("SKIP  gdn_block: fla.modules not importable")
        return
    torch.set_float32_matmul_precision("highest")
    cfg = HydraConfig.from_preset("160m")
    layer = GatedDeltaNet(cfg).to(device)
    x = torch.randn(1, 1024, cfg.d_model, device=device)
    w = torch.randn(1, 1024, cfg.d_model, device=device)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    variants = {
        "fla-fp32": ("fla", torch.float32, 1e-4),
        "fla-bf16": ("fla", torch.bfloat16, 3e-2),
        "torch-bf16": ("torch", torch.bfloat16, 3e-2),
    }
    wanted = os.environ.get("GPU_CHECK_GDN_BLOCK", ",".join(variants)).split(",")
    started = time.perf_counter()

    def run(modules: str, dtype: torch.dtype):
        inp = x.clone().requires_grad_()
        bf16 = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16)
        with _env("HYDRALM_GDN_MODULES", modules), bf16:
            y, state = layer(inp)
        grads = torch.autograd.grad((y.float() * w).sum(), [inp, *layer.parameters()])
        torch.cuda.synchronize()
        print(f"      gdn_block {modules} {dtype} ran ({time.perf_counter() - started:.0f} s so far)", flush=True)
        return y, state.S, grads

    with _env("HYDRALM_DELTANET", "torch"):
        ref = run("torch", torch.float32)
        for key in wanted:
            modules, dtype, tol = variants[key]
            out, state, grads = run(modules, dtype)
            label = f"gdn_block {modules} modules {dtype}"
            _record(f"{label} out", _rel(out, ref[0]), tol)
            _record(f"{label} final state", _rel(state, ref[1]), tol)
            for name, ga, gb in zip(names, grads, ref[2]):
                _record(f"{label} d{name}", _rel(ga, gb), tol * 3)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    torch.manual_seed(0)
    print({"device": torch.cuda.get_device_name(), "torch": torch.__version__}, flush=True)
    names = sys.argv[1:] or [
        "delta_rule",
        "qk_norm",
        "state_pass",
        "fla",
        "flex",
        "static_decode",
        "decode_fused",
        "retrieval_decode",
        "swa_decode",
        "decode_linear",
        "spec_decode",
        "retrieval",
        "retrieval_stream",
        "exactness",
        "gdn_block",
        "cross_entropy",
        "rmsnorm",
        "swiglu",
        "rotary",
        "short_conv",
    ]
    checks = {
        "delta_rule": check_delta_rule,
        "qk_norm": check_qk_norm,
        "state_pass": check_state_pass,
        "fla": check_fla,
        "flex": check_flex,
        "static_decode": check_static_decode,
        "decode_fused": check_decode_fused,
        "retrieval_decode": check_retrieval_decode,
        "swa_decode": check_swa_decode,
        "decode_linear": check_decode_linear,
        "spec_decode": check_spec_decode,
        "retrieval": check_retrieval,
        "retrieval_stream": check_retrieval_stream,
        "exactness": check_exactness,
        "gdn_block": check_gdn_block,
        "cross_entropy": check_cross_entropy,
        "rmsnorm": check_rmsnorm,
        "swiglu": check_swiglu,
        "rotary": check_rotary,
        "short_conv": check_short_conv,
    }
    for name in names:
        checks[name]("cuda")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(ROWS, f, indent=1)
    failed = [r["check"] for r in ROWS if not r["ok"]]
    print(f"{len(ROWS) - len(failed)}/{len(ROWS)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
