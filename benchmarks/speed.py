"""GPU speed benchmarks; each prints a table. Time the peers on the same machine in the same sitting so
that ratios compare like with like:

    python -m benchmarks.speed [layers] [models] [decode] [decode_batched] [claim_models] [loss] [norm] [swiglu]
        [rotary] [short_conv] [short_conv_tiles] [state_pass] [gdn_parts]

layers  (env BENCH_GDN=torch,triton,fused and BENCH_ATTENTION_CONTEXTS=4096,16384,65536 pick the rows) bf16
        fwd+bwd: our GDN kernel (PyTorch loop, Triton pass over chunks, fully fused Triton; BENCH_COMPILE=1
        adds a torch.compile'd Triton variant) at B8 T4096 H16 K128; SWA (flex) and retrieval
        (flex, token-routed, C=128, k=8) at 4k/16k/64k with 64k tokens per batch, H16 D128.
models  training step of HydraLM-160m (20-layer schedule; BENCH_MODELS picks among HydraLM-160m,
        "HydraLM-160m fused-GDN", "HydraLM-160m triton-GDN", "HydraLM-160m compiled-GDN", Dense-160m) and of
        the DenseTransformer with the same fields, bf16 autocast, fused AdamW, 64k tokens per step, at
        4k/16k/64k context.
decode  batch-1 decode latency of HydraLM-160m (compressive memory on) after 4k, 64k and 1M tokens of context
        (BENCH_DECODE_CONTEXTS); the context is streamed in 8192-token chunks (prefill tokens/s, the decode
        state's MiB and the peak GPU memory so far printed too).
        BENCH_DECODE_STATIC=1 adds the StaticDecoder step captured as a CUDA graph (static_graph_ms) and
        the seconds to build it or load a new state into it, compile and capture included (static_setup_s).
decode_batched  graph decode of HydraLM-160m (compressive memory, mtp_depth=2) as `generate(decoder="graph")` runs
        it: tokens/s over all rows at batch 1, 8 and 64 (BENCH_DECODE_BATCHES) after 4k and 1M tokens
        (BENCH_DECODE_CONTEXTS; the state of one streamed row, repeated per row: decoding cost does not depend
        on what the rows hold), then greedy MTP self-draft (k = 2) vs greedy graph `generate` at batch 1, both
        on CUDA graphs, prefill subtracted. BENCH_CKPT: a trained checkpoint (mtp_depth >= 2, memory on) instead
        of random weights (then only mtp_speedup is recorded: the decode figures are the 160m preset's;
        BENCH_DECODE_BATCHES= skips their timing, BENCH_MTP=0 the speed-up's), BENCH_TEXT: a text file, prompt =
        512 bytes of its last 4 KB; random weights and random prompts measure the machinery, not a trained
        model's acceptance rate. BENCH_STREAM_COMPILE=1 streams through `model.compile_blocks()` (the stream is
        bound by host time per PyTorch call; keys streaming_prefill_ktok_s/160m-memory-compiled/<context>);
        BENCH_STREAM_PIECE (default 8192) is the stream's piece size (other sizes: keys
        streaming_prefill_ktok_s/160m-memory-piece<size>/<context>).
claim_models  training step of the models the `full` claim budget trains (hydralm/eval/claims.py).
loss    the LM head's linear + cross-entropy, fwd+bwd, bf16, 64k rows x d 768 x 32000 ids: our chunked PyTorch
        loss (the default), its Triton softmax kernels (triton) and the fused kernels HYDRALM_CROSS_ENTROPY can
        pick (fla, liger; those that import),
        ms and peak GiB                                          -> kernel_ms/ce-<impl>/65536x32000
norm    one block RMSNorm, fwd+bwd, 64k tokens x d 768, fp32 residual under bf16 autocast: the PyTorch form and
        the Triton kernels (HYDRALM_NORM=triton)                 -> kernel_ms/rmsnorm-{torch,triton}/65536x768
swiglu  SwiGLU's down part (silu(gate) * up, then the down projection), fwd+bwd, 64k tokens x hidden 2048 x
        d 768, bf16 h and an fp32 weight under bf16 autocast: the PyTorch form (`_SwiGLUDown`) and the Triton
        kernels (HYDRALM_SWIGLU=triton)                          -> kernel_ms/swiglu-{torch,triton}/65536x2048
rotary  the rotary embedding of q and k, fwd+bwd, B1 H12 N65536 D64, bf16 strided views of one qkv tensor as
        the attention layers pass them: the PyTorch form and the Triton kernel (HYDRALM_ROTARY=triton)
                                                                 -> kernel_ms/rotary-{torch,triton}/65536x12x64
short_conv  the Gated DeltaNet block's short conv + SiLU, fwd+bwd, 64k tokens x 2304 channels (q, k, v of the 160m
        block), kernel 4, bf16 x (a slice of a wider projection output) and an fp32 weight: the PyTorch form, fla's
        causal_conv1d and the Triton kernels (HYDRALM_SHORT_CONV)
                                                                 -> kernel_ms/short-conv-{torch,fla,triton}/65536x2304
short_conv_tiles  each Triton short-conv kernel (forward, dz with the dw partial sums over 1 / 4 / 16 row tiles a
        program, dx) alone at the same shape over 8 / 16 / 32 rows x 64 / 128 / 256 channels x 4 / 8 warps per tile, and
        fla's forward: where the tile sizes in kernels/conv/triton_short_conv.py come from (printed, not recorded)
state_pass  the fused delta rule (fwd+bwd, bf16, H 12 K 64) at 64k tokens as 1 x 64k, 4 x 16k and 16 x 4k, its pass
        over chunks walked whole or in segments                  -> kernel_ms/gdn-fused{,-one-walk}/B<B>-T<T>-H12-K64
gdn_parts  the same kernel by part at those shapes: the prep kernel alone, prep + pass, forward, forward + backward,
        and forward + backward of the packed call (q, k, v in one head-last tensor, q and k normalised inside)
Results also go to $OUT/speed.json when OUT is set.
"""

import json
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from benchmarks import record

RESULTS: dict = {}
DECODE_MEMORY = {"exact_window": 4096, "compress_every": 8, "pool_size": 4096}  # the streaming model's memory


def coherent_queries(noise: torch.Tensor, tile: int = 128) -> torch.Tensor:
    """Queries (B, H, N, D) whose `tile`-long runs share one random direction, plus 10 % of `noise`: as when a
    tile's tokens ask about one thing, they route to nearly the same chunks. (A tile's mean query plus noise
    would be noise-dominated.)"""
    B, H, N, D = noise.shape
    shared = torch.randn(B, H, N // tile, 1, D, device=noise.device, dtype=noise.dtype)
    return (shared + 0.1 * noise.unflatten(2, (N // tile, tile))).flatten(2, 3)


def bench(fn, rep: int = 50) -> float:
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def training_step(model: torch.nn.Module, ids: torch.Tensor, opt: torch.optim.Optimizer):
    """One bf16-autocast training step (forward, CE loss against `ids` as a throughput proxy, backward, AdamW),
    with the loss the trainer uses: no full logits (chunked linear + cross-entropy, kernels/cross_entropy/)."""

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, return_logits=False)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _print_table(title: str, rows: list, cols: list) -> None:
    print(f"\n## {title}\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    for row in rows:
        print(
            "| "
            + " | ".join(
                f"{row.get(c, ''):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols
            )
            + " |",
            flush=True,
        )


def layers() -> None:
    from hydralm.kernels.attention.flex import sliding_window_flex
    from hydralm.kernels.delta_rule import delta_rule_chunkwise
    from hydralm.kernels.retrieval.flex import retrieval_flex

    rows = []
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as in training
    variants = [(b, False) for b in os.environ.get("BENCH_GDN", "torch,triton,fused").split(",") if b]
    if os.environ.get("BENCH_COMPILE"):  # torch.compile around the chunkwise prep/output (the loop is a kernel)
        variants.append(("triton", True))
    for B, T, H, K in [(8, 4096, 16, 128), (16, 2048, 12, 64)]:  # the peer script's two GDN shapes
        q = F.normalize(torch.randn(B, H, T, K, device="cuda"), dim=-1).bfloat16().requires_grad_()
        k = F.normalize(torch.randn(B, H, T, K, device="cuda"), dim=-1).bfloat16().requires_grad_()
        v = torch.randn(B, H, T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = F.logsigmoid(torch.randn(B, H, T, device="cuda") + 4).requires_grad_()
        beta = torch.rand(B, H, T, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for backend, compiled in variants:
            fn = torch.compile(delta_rule_chunkwise) if compiled else delta_rule_chunkwise

            def gdn():
                o, _ = fn(q, k, v, g, beta, chunk_size=64, backend=backend)
                o.float().sum().backward()

            name = f"GDN {backend} chunkwise ({'compiled' if compiled else 'eager'})"
            rows.append({"layer": name, "shape": f"B{B} T{T} H{H} K{K}", "ms": bench(gdn, 20)})
            print(rows[-1], flush=True)
    rows += _state_pass_rows()
    Hh, D, C, TOPK, W = 16, 128, 128, 8, 512
    for T in [int(t) for t in os.environ.get("BENCH_ATTENTION_CONTEXTS", "4096,16384,65536").split(",") if t]:
        B = max(1, 65536 // T)
        q, k, v = (torch.randn(B, Hh, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        # ~14 tiles visited per query tile at 64k with coherent queries, vs ~235 for random ones
        coherent_q = coherent_queries(q.detach().float()).bfloat16().requires_grad_()

        def swa():
            sliding_window_flex(q, k, v, W).sum().backward()

        def ret(query):
            return lambda: retrieval_flex(query, k, v, C, TOPK).sum().backward()

        row = {
            "layer": "attention",
            "shape": f"B{B} T{T} H{Hh} D{D}",
            "swa_flex_ms": bench(swa),
            "retrieval_random_q_ms": bench(ret(q), 20),
            "retrieval_coherent_q_ms": bench(ret(coherent_q), 20),
        }
        row["retrieval/swa (coherent)"] = row["retrieval_coherent_q_ms"] / row["swa_flex_ms"]
        rows.append(row)
        print(row, flush=True)
    RESULTS["layers"] = rows
    _print_table(
        "layers, bf16 fwd+bwd (ms)",
        rows,
        [
            "layer",
            "shape",
            "ms",
            "fwd_ms",
            "swa_flex_ms",
            "retrieval_random_q_ms",
            "retrieval_coherent_q_ms",
            "retrieval/swa (coherent)",
        ],
    )


def _state_pass_rows() -> list:
    """The pass over chunks alone (PyTorch loop vs Triton kernels), fwd and fwd+bwd, at the GDN shapes of the
    layer row above (K128) and of the 160m preset at 64k tokens/step (K64)."""
    from hydralm.kernels.delta_rule.chunk import state_pass_torch
    from hydralm.kernels.delta_rule.triton_state_pass import state_pass_triton

    rows = []
    for B, H, n, C, K in ((8, 16, 64, 64, 128), (16, 12, 64, 64, 64)):
        U = torch.randn(B, H, n, C, K, device="cuda", requires_grad=True)
        W, Kd = (0.05 * torch.randn(B, H, n, C, K, device="cuda") for _ in range(2))
        W.requires_grad_(), Kd.requires_grad_()
        a = torch.rand(B, H, n, device="cuda", requires_grad=True)
        for name, fn in (("torch loop", state_pass_torch), ("triton", state_pass_triton)):
            s0 = torch.zeros(B, H, K, K, device="cuda")
            with torch.no_grad():
                fwd = bench(lambda fn=fn, s0=s0: fn(U, W, Kd, a, s0), 20)

            def fwd_bwd(fn=fn, s0=s0):
                h, d, sn = fn(U, W, Kd, a, s0)
                (h.sum() + d.sum() + sn.sum()).backward()

            rows.append(
                {
                    "layer": f"state pass {name}",
                    "shape": f"B{B} H{H} n{n} C{C} K{K}",
                    "fwd_ms": fwd,
                    "ms": bench(fwd_bwd, 20),
                }
            )
            print(rows[-1], flush=True)
    return rows


GDN_HEADS, GDN_HEAD_DIM = 12, 64  # the 160m preset's Gated DeltaNet heads
GDN_SHAPES = ((1, 65536), (4, 16384), (16, 4096))  # (batch, tokens): 64k tokens per step


def _gdn_inputs(B: int, T: int):
    """q, k, v (B, H, T, K) bf16 (q, k unit rows), g (log decay) and beta fp32, all requiring grad."""
    H, K = GDN_HEADS, GDN_HEAD_DIM
    q = F.normalize(torch.randn(B, H, T, K, device="cuda"), dim=-1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(B, H, T, K, device="cuda"), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(B, H, T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = F.logsigmoid(torch.randn(B, H, T, device="cuda") + 4).requires_grad_()
    beta = torch.rand(B, H, T, device="cuda", requires_grad=True)
    return q, k, v, g, beta


def gdn_parts() -> None:
    """Where the fused delta rule's time goes (bf16, TF32, H 12 K 64) at the preset's 64k-token shapes: the prep
    kernel alone (each chunk's WY factors and inverse), prep + the pass over chunks, the whole forward, and
    forward + backward (whose backward rebuilds the prep and the pass before its own three kernels); then forward
    + backward of the packed call (`delta_rule_fused_packed`, HYDRALM_DELTANET_PACKED's: q, k, v in one
    head-last tensor, q and k normalised in the kernels)."""
    from hydralm.kernels.delta_rule import triton_fused as tf

    torch.set_float32_matmul_precision("high")
    rows = []
    for B, T in GDN_SHAPES:
        q, k, v, g, beta = _gdn_inputs(B, T)
        consts = tf.kernel_constants(64, GDN_HEAD_DIM, GDN_HEAD_DIM)
        kd, vd, gd, bd = k.detach(), v.detach(), g.detach().contiguous(), beta.detach().contiguous()

        def fwd_bwd():
            o, _ = tf.delta_rule_fused(q, k, v, g, beta)
            o.float().sum().backward()

        def fwd():
            with torch.no_grad():
                tf.delta_rule_fused(q, k, v, g, beta)

        row = {"shape": f"B{B}-T{T}-H{GDN_HEADS}-K{GDN_HEAD_DIM}"}
        row["prep_ms"] = bench(lambda: tf.chunk_factors(kd, vd, gd, bd, consts), 100)
        row["prep_pass_ms"] = bench(lambda: tf.chunk_pass(kd, vd, gd, bd, None, consts), 100)
        row["fwd_ms"] = bench(fwd, 100)
        row["fwd_bwd_ms"] = bench(fwd_bwd, 100)
        # HYDRALM_DELTANET_PACKED's call: raw q, k, v in one head-last tensor, q and k normalised in the kernels
        packed = torch.stack([t.detach().transpose(1, 2) for t in (q, k, v)], dim=2).requires_grad_()

        def fwd_bwd_packed():
            o, _ = tf.delta_rule_fused_packed(packed, g, beta, qk_l2norm_eps=1e-6)
            o.float().sum().backward()

        row["fwd_bwd_packed_ms"] = bench(fwd_bwd_packed, 100)
        rows.append(row)
        print(row, flush=True)
    RESULTS["gdn_parts"] = rows
    _print_table("fused delta rule by part (ms)", rows, list(rows[0]))


def state_pass() -> None:
    """The fused delta rule (fwd+bwd, bf16, TF32, H 12 K 64: the 160m layer's kernel) at the preset's three
    64k-token shapes, its pass over chunks walked as one sequence per (batch, head) or cut into segments
    (kernels/delta_rule/triton_state_pass.py): `auto` is the default choice, `one walk` never segments, and
    the fixed lengths show where the choice sits."""
    from hydralm.kernels.delta_rule import delta_rule_chunkwise
    from hydralm.kernels.delta_rule import triton_state_pass as sp

    torch.set_float32_matmul_precision("high")
    rows, H, K = [], GDN_HEADS, GDN_HEAD_DIM
    for B, T in GDN_SHAPES:
        n = T // 64
        q, k, v, g, beta = _gdn_inputs(B, T)

        def gdn():
            o, _ = delta_rule_chunkwise(q, k, v, g, beta, chunk_size=64, backend="fused")
            o.float().sum().backward()

        shape = f"B{B}-T{T}-H{H}-K{K}"
        for label, seg in (("auto", None), ("one walk", n), ("64", 64), ("32", 32), ("16", 16)):
            sp.SEGMENT_CHUNKS = seg
            chosen = sp.segment_chunks(n, B * H)
            rows.append({"shape": shape, "segments": label, "chunks_per_segment": chosen, "ms": bench(gdn, 20)})
            print(rows[-1], flush=True)
            if label in ("auto", "one walk"):
                key = "gdn-fused" if label == "auto" else "gdn-fused-one-walk"
                peer = f"kernel_ms/gdn-fused-one-walk/{shape}" if label == "auto" else None
                record.record(f"kernel_ms/{key}/{shape}", rows[-1]["ms"], "ms", peer=peer)
                record.write()
        sp.SEGMENT_CHUNKS = None
    RESULTS["state_pass"] = rows
    _print_table("fused delta rule, fwd+bwd, bf16, by segment length", rows, list(rows[0]))


def models() -> None:
    from hydralm import DenseTransformer, HydraConfig, HydraLM

    cfg = HydraConfig.from_preset("160m")
    torch.set_float32_matmul_precision("high")
    rows = []
    # the GDN kernel each HydraLM variant runs (kernels/backend.py); "HydraLM-160m" runs auto (triton on CUDA)
    variants = {
        "HydraLM-160m": (HydraLM, "auto", "0"),
        "HydraLM-160m fused-GDN": (HydraLM, "fused", "0"),
        "HydraLM-160m triton-GDN": (HydraLM, "triton", "0"),
        "HydraLM-160m compiled-GDN": (HydraLM, "triton", "1"),
        "Dense-160m": (DenseTransformer, "auto", "0"),
    }
    for name in os.environ.get("BENCH_MODELS", "HydraLM-160m,Dense-160m").split(","):
        cls, gdn, compile_gdn = variants[name]
        os.environ.update(HYDRALM_DELTANET=gdn, HYDRALM_DELTANET_COMPILE=compile_gdn)
        model = cls(cfg).cuda()
        params = model.num_parameters()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        for T in [int(t) for t in os.environ.get("BENCH_CONTEXTS", "4096,16384,65536").split(",")]:
            B = max(1, 65536 // T)
            ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
            step = training_step(model, ids, opt)

            try:
                ms = bench(step, 10)
                rows.append({"model": name, "params_M": params / 1e6, "T": T, "B": B, "ms": ms, "ktok_s": B * T / ms})
            except torch.OutOfMemoryError:
                rows.append({"model": name, "params_M": params / 1e6, "T": T, "B": B, "ms": "OOM"})
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)
            if isinstance(rows[-1]["ms"], float):
                key = name.replace(" ", "-")
                peer = None if key == "Dense-160m" else f"train_ktok_s/Dense-160m/{T}"
                record.record(f"train_ktok_s/{key}/{T}", rows[-1]["ktok_s"], "ktok/s", peer=peer)
                record.write()
        del model, opt
        torch.cuda.empty_cache()
    RESULTS["models"] = rows
    _print_table("training step, bf16 autocast, 64k tokens/step", rows, ["model", "params_M", "T", "B", "ms", "ktok_s"])


def claim_models() -> None:
    """Training-step time of the models the `full` claim budget trains (C7, C10): sizes its step counts."""
    from hydralm import HydraConfig, HydraLM
    from hydralm.eval.claims import BUDGETS

    torch.set_float32_matmul_precision("high")
    rows = []
    for claim in ("c7", "c10"):
        b = BUDGETS["full"][claim]
        cfg = HydraConfig.from_preset(b["model"], **b["model_overrides"])
        model = HydraLM(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, cfg.vocab_size, (b["batch_size"], b["seq_len"]), device="cuda")
        ms = bench(training_step(model, ids, opt), 10)
        rows.append(
            {
                "claim": claim,
                "params_M": model.num_parameters() / 1e6,
                "B": b["batch_size"],
                "T": b["seq_len"],
                "ms": ms,
                "ktok_s": b["batch_size"] * b["seq_len"] / ms,
            }
        )
        print(rows[-1], flush=True)
    RESULTS["claim_models"] = rows
    _print_table("full-budget claim models, training step", rows, ["claim", "params_M", "B", "T", "ms", "ktok_s"])


@torch.no_grad()
def decode() -> None:
    from hydralm import HydraConfig, HydraLM, StreamingEngine
    from hydralm.state import state_bytes
    from hydralm.static_decode import StaticDecoder

    cfg = HydraConfig.from_preset("160m", memory=DECODE_MEMORY)
    model = HydraLM(cfg).cuda().bfloat16().eval()
    rows = []
    engine = StreamingEngine(model, chunk_size=8192)
    done, static = 0, None
    contexts = [int(c) for c in os.environ.get("BENCH_DECODE_CONTEXTS", "4096,65536,1048576").split(",")]
    for context in contexts:
        torch.cuda.synchronize()
        started = time.perf_counter()
        engine.process(torch.randint(0, cfg.vocab_size, (1, context - done), device="cuda"))
        torch.cuda.synchronize()
        prefill_tok_s = (context - done) / (time.perf_counter() - started)
        done = context
        token, current = torch.zeros(1, dtype=torch.long, device="cuda"), [engine.state]

        def step():
            current[0] = model.step(token, current[0])[1]

        windows = timed_windows(step, warmup=20)
        ms = sorted(windows)[2]
        rows.append(
            {
                "context": context,
                "ms_per_token": ms,
                "min_ms": min(windows),
                "max_ms": max(windows),
                "tok_s": 1e3 / ms,
                "prefill_tok_s": prefill_tok_s,
                "state_MiB": state_bytes(engine.state) / 2**20,
                "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
                "latency_vs_first": ms / rows[0]["ms_per_token"] if rows else 1.0,
            }
        )
        if os.environ.get("BENCH_DECODE_STATIC"):  # the fixed-shape step as a CUDA graph, from the same state
            started = time.perf_counter()
            if static is None:
                static = StaticDecoder(model, engine.state, compile=True, compile_mode="reduce-overhead")
            else:
                static.load(engine.state)  # same shapes: the captured graph is reused
            static.step(token)  # the first call compiles and captures (the first context only)
            torch.cuda.synchronize()
            rows[-1]["static_setup_s"] = time.perf_counter() - started
            rows[-1]["static_graph_ms"] = sorted(timed_windows(lambda: static.step(token), warmup=20))[2]
        print(rows[-1], flush=True)  # a long context may outlast the call: keep what was measured
        RESULTS["decode"] = rows
        graph_ms = rows[-1].get("static_graph_ms")  # what generate(decoder="auto") runs on CUDA for long outputs
        record.record(f"decode_tok_s/160m-memory-bs1/{context}", 1e3 / (graph_ms or ms), "tok/s")
        record.record(f"streaming_prefill_ktok_s/160m-memory/{context}", prefill_tok_s / 1e3, "ktok/s")
        record.write()
    _print_table(
        "batch-1 decode, HydraLM-160m bf16, memory on",
        rows,
        [
            "context",
            "ms_per_token",
            "min_ms",
            "max_ms",
            "tok_s",
            "latency_vs_first",
            "prefill_tok_s",
            "state_MiB",
            "peak_GiB",
            "static_graph_ms",
            "static_setup_s",
        ],
    )


@torch.no_grad()
def decode_batched(
    model=None,
    contexts=None,
    batches=None,
    kind: str = "graph",
    mtp_new_tokens: int = 512,
    prompt=None,
    subject: str = "160m",
    run=None,
) -> dict:
    """Batched graph decode tokens/s and the MTP self-draft speed-up (module docstring). Every argument has the
    GPU default; a CPU smoke test passes a tiny memory model, small contexts and kind="static". Figures go to
    `run` (default: this process's record run, written after each row)."""
    from hydralm import HydraConfig, HydraLM, StreamingEngine
    from hydralm.generation import _static_decoder
    from hydralm.state import select_rows

    run = record.RUN if run is None else run
    # a checkpoint is for the speed-up of its trained head; the decode figures belong to the 160m preset
    decode_figures = model is not None or not os.environ.get("BENCH_CKPT")
    if model is None:
        if os.environ.get("BENCH_CKPT"):
            from hydralm import load_model

            model = load_model(os.environ["BENCH_CKPT"])
        else:
            model = HydraLM(HydraConfig.from_preset("160m", memory=DECODE_MEMORY, mtp_depth=2))
        model = model.cuda().bfloat16().eval()
    device = model.embed.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    env_list = lambda name, default: [int(x) for x in os.environ.get(name, default).split(",") if x]  # noqa: E731
    contexts = contexts or env_list("BENCH_DECODE_CONTEXTS", "4096,1048576")
    batches = batches or env_list("BENCH_DECODE_BATCHES", "1,8,64")
    vocab = model.cfg.vocab_size
    # the stream's piece (StreamingEngine.chunk_size); a piece costs the host a fixed ~2,000 PyTorch calls
    piece = int(os.environ.get("BENCH_STREAM_PIECE", "8192"))
    rows, engine, done, mtp = [], StreamingEngine(model, chunk_size=piece), 0, None
    stream_key = f"{subject}-memory" + ("" if piece == 8192 else f"-piece{piece}")
    variant = decode_variant()
    if os.environ.get("BENCH_STREAM_COMPILE") == "1":  # the stream through torch.compile'd blocks (its own keys)
        model.compile_blocks()
        stream_key += "-compiled"
    # a throwaway stream over the first context and then two more chunks compiles the prefill paths (from scratch
    # and with a state; compiled blocks settle on their dynamic shapes by the third call), so the rates below are
    # streaming, not compilation
    warm = StreamingEngine(model, chunk_size=piece)
    for length in (contexts[0], piece, piece):
        warm.process(torch.randint(0, vocab, (1, length), device=device))
    for context in contexts:
        sync()
        started = time.perf_counter()
        engine.process(torch.randint(0, vocab, (1, context - done), device=device))
        sync()
        prefill_ktok_s = (context - done) / (time.perf_counter() - started) / 1e3
        print({"context": context, "streaming_prefill_ktok_s": prefill_ktok_s}, flush=True)
        if decode_figures:
            run.record(f"streaming_prefill_ktok_s/{stream_key}/{context}", prefill_ktok_s, "ktok/s")
        done = context
        for batch in batches:
            state = select_rows(engine.state, [0] * batch)  # one stream per row, at the same position
            started = time.perf_counter()
            decoder = _static_decoder(model, state, kind, batch)  # generate's cache: compiled once per batch size
            token = torch.randint(0, vocab, (batch,), device=device)
            decoder.step(token)  # the first call compiles and captures
            sync()
            setup_s = time.perf_counter() - started
            ms = sorted(timed_windows(lambda: decoder.step(token), warmup=10, sync=sync))[2]
            rows.append({"context": context, "batch": batch, "ms_per_step": ms, "tok_s": batch * 1e3 / ms})
            rows[-1]["setup_s"] = setup_s
            print(rows[-1], flush=True)
            if decode_figures:
                run.record(f"decode_tok_s/{subject}-memory{variant}-bs{batch}/{context}", batch * 1e3 / ms, "tok/s")
            if run is record.RUN:
                record.write()  # after each row: a run cut short keeps what it measured
        RESULTS["decode_batched"] = rows
        if mtp is None and os.environ.get("BENCH_MTP", "1") != "0":  # after the first context (the long one last)
            RESULTS["mtp"] = mtp = _mtp_speedup(model, kind, mtp_new_tokens, prompt, sync)
            print(mtp, flush=True)
            run.record(f"mtp_speedup/{subject}{variant}-k2", mtp["speedup"], "×")
        if run is record.RUN:
            record.write()
    _print_table("graph decode, tokens/s over all rows", rows, ["context", "batch", "ms_per_step", "tok_s", "setup_s"])
    return {"decode": rows, "mtp": mtp}


# opt-in decode paths measure under keys of their own, so the record keeps the default's figures beside them
DECODE_OPT_INS = {
    ("HYDRALM_DECODE_LINEAR", "fused"): "-folded",
    ("HYDRALM_RETRIEVAL_DECODE", "triton"): "-retrieval-kernel",
    ("HYDRALM_SWA_DECODE", "triton"): "-swa-kernel",
    ("HYDRALM_DECODE_MANY", "looped"): "-looped-verify",
}


def decode_variant() -> str:
    """The key suffix of the opt-in decode paths this process runs ('' for the defaults)."""
    return "".join(suffix for (name, value), suffix in DECODE_OPT_INS.items() if os.environ.get(name) == value)


def _mtp_speedup(model, kind: str, new_tokens: int, prompt, sync) -> dict:
    """Greedy self-draft (k = 2) vs greedy generate, both through `kind` decoders at batch 1: decode seconds
    (the call minus its prefill), each the median of three calls after one that compiles."""
    from hydralm import generate, speculative_generate
    from hydralm.generation import prefill

    device = model.embed.weight.device
    if prompt is None:
        if os.environ.get("BENCH_TEXT"):
            from hydralm.data import byte_level_tokenizer

            with open(os.environ["BENCH_TEXT"], "rb") as f:  # the file's end: a single-document corpus's test split
                f.seek(max(0, os.path.getsize(os.environ["BENCH_TEXT"]) - 4096))
                text = f.read().decode("utf-8", errors="ignore")
            prompt = torch.tensor(byte_level_tokenizer().encode(text).ids[:512], device=device)[None]
        else:
            prompt = torch.randint(0, model.cfg.vocab_size, (1, 512), device=device)

    def seconds(fn, repeats: int = 3):
        """The median of `repeats` timed calls after one untimed call (which compiles and captures): a single
        call of a few hundred tokens moved the speed-up by a tenth from one run to the next."""
        fn()
        times = []
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - started)
        return out, statistics.median(times)

    _, prefill_s = seconds(lambda: prefill(model, prompt))
    plain, plain_s = seconds(lambda: generate(model, prompt, new_tokens, temperature=0, decoder=kind))
    (spec, stats), spec_s = seconds(
        lambda: speculative_generate(model, None, prompt, new_tokens, k=2, temperature=0, decoder=kind)
    )
    plain_decode, spec_decode = max(plain_s - prefill_s, 1e-9), max(spec_s - prefill_s, 1e-9)
    return {
        "new_tokens": new_tokens,
        "identical_to_generate": bool(torch.equal(plain, spec)),
        "acceptance": stats.acceptance_rate,
        "acceptance_by_depth": stats.acceptance_by_depth(),
        "tokens_per_round": stats.tokens_per_round,
        "generate_tok_s": new_tokens / plain_decode,
        "self_draft_tok_s": new_tokens / spec_decode,
        "speedup": plain_decode / spec_decode,
    }


def loss() -> None:
    """The LM head's loss per implementation (module docstring): fwd+bwd ms and the peak memory above the inputs."""
    import importlib

    from hydralm.kernels.cross_entropy import linear_cross_entropy

    N, d, V = 65536, 768, 32000
    hidden = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (0.02 * torch.randn(V, d, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda")
    rows = []
    for impl, module in (("torch", None), ("triton", None), ("fla", "fla.modules.fused_linear_cross_entropy"),
                         ("liger", "liger_kernel.transformers.functional")):  # fmt: skip
        try:
            if module:
                importlib.import_module(module)
        except Exception as err:
            print(f"{impl}: {module} does not import ({type(err).__name__}); skipped", flush=True)
            continue
        os.environ["HYDRALM_CROSS_ENTROPY"] = impl

        def step():
            linear_cross_entropy(hidden, weight, labels).backward()

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = bench(step)
        rows.append({"impl": impl, "ms": ms, "peak_GiB": (torch.cuda.max_memory_allocated() - base) / 2**30})
        print(rows[-1], flush=True)
        record.record(
            f"kernel_ms/ce-{impl}/{N}x{V}", ms, "ms", peer=None if impl == "torch" else f"kernel_ms/ce-torch/{N}x{V}"
        )
        record.write()
    os.environ.pop("HYDRALM_CROSS_ENTROPY", None)
    RESULTS["loss"] = rows
    _print_table("LM head linear + cross-entropy, fwd+bwd, bf16", rows, ["impl", "ms", "peak_GiB"])


def norm() -> None:
    """One block RMSNorm at 64k tokens x d 768 as training runs it (an fp32 residual stream under bf16
    autocast; backward keeps a bf16 copy), fwd+bwd: the PyTorch form and the Triton kernels (HYDRALM_NORM)."""
    from hydralm.modules.rmsnorm import RMSNorm

    N, d = 65536, 768
    x = torch.randn(N, d, device="cuda", requires_grad=True)
    layer = RMSNorm(d).cuda()
    dy = torch.randn(N, d, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(dy)

    title = "block RMSNorm, fwd+bwd, fp32 residual under bf16 autocast"
    _torch_vs_triton("norm", f"rmsnorm-{{}}/{N}x{d}", lambda impl: step, title, switch="HYDRALM_NORM")


def _torch_vs_triton(section: str, key: str, step_for, title: str, switch: Optional[str] = None) -> None:
    """Time `step_for(impl)` for the PyTorch form and the Triton kernels (with `switch` set to each, when given)
    and record `kernel_ms/<key with impl>`, the Triton row against the PyTorch one."""
    rows = []
    for impl in ("torch", "triton"):
        if switch:
            os.environ[switch] = impl
        ms = bench(step_for(impl))
        rows.append({"impl": impl, "ms": ms})
        print(rows[-1], flush=True)
        peer = None if impl == "torch" else f"kernel_ms/{key.format('torch')}"
        record.record(f"kernel_ms/{key.format(impl)}", ms, "ms", peer=peer)
        record.write()
    if switch:
        os.environ.pop(switch, None)
    RESULTS[section] = rows
    _print_table(title, rows, ["impl", "ms"])


def swiglu() -> None:
    """SwiGLU's down part at 64k tokens x hidden 2048 x d 768 as training runs it (the gate_up output h in bf16
    under bf16 autocast, an fp32 weight), fwd+bwd: the PyTorch form and the Triton kernels (HYDRALM_SWIGLU)."""
    from hydralm.kernels.activation.triton_swiglu import swiglu_down_triton
    from hydralm.modules.swiglu import _SwiGLUDown

    def pytorch_form(h, weight):
        gate, up = h.chunk(2, dim=-1)  # backward concatenates the halves' gradients, as in the model
        return _SwiGLUDown.apply(gate, up, weight)

    N, hidden, d = 65536, 2048, 768
    h = torch.randn(N, 2 * hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(d, hidden, device="cuda") / hidden**0.5).requires_grad_()
    dy = torch.randn(N, d, device="cuda", dtype=torch.bfloat16)
    forms = {"torch": pytorch_form, "triton": swiglu_down_triton}

    def step_for(impl):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = forms[impl](h, weight)
            torch.autograd.grad(out, (h, weight), dy)  # no accumulation into .grad: the op's own work only

        return step

    title = "SwiGLU down part, fwd+bwd, bf16 h under bf16 autocast"
    _torch_vs_triton("swiglu", f"swiglu-{{}}/{N}x{hidden}", step_for, title)


def rotary() -> None:
    """The rotary embedding of q and k at B1 H12 N65536 D64 as an attention layer runs it in training (bf16
    (B, H, N, D) views of one qkv tensor, positions from 0), fwd+bwd: the PyTorch form and the Triton kernel
    (HYDRALM_ROTARY)."""
    from hydralm.modules.rotary import Rotary

    B, H, N, D = 1, 12, 65536, 64
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rope = Rotary(D).cuda()
    positions = torch.arange(N, device="cuda")
    dy = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)

    def step():
        q, k, _ = (t.transpose(1, 2) for t in qkv.unbind(2))
        rotated = (rope(q, positions), rope(k, positions))
        torch.autograd.grad(rotated, (q, k), (dy, dy))  # gradients of the views: the rotation's own work only

    title = "rotary embedding of q and k, fwd+bwd, bf16 strided views"
    _torch_vs_triton("rotary", f"rotary-{{}}/{N}x{H}x{D}", lambda impl: step, title, switch="HYDRALM_ROTARY")


# The 160m Gated DeltaNet block's short conv at 64k tokens: q, k, v channels, kernel size, and the rest of the input
# projection's output row (gate 768, a and b 12 each) that x is a slice of
SHORT_CONV_SHAPE, PROJECTION_REST = (65536, 2304, 4), 792


def short_conv() -> None:
    """The Gated DeltaNet block's short conv as the 160m block runs it in training (module docstring): each
    implementation's fwd+bwd, the Triton row (the CUDA default) recorded against fla's."""
    from hydralm.modules.short_conv import ShortConv

    N, C, K = SHORT_CONV_SHAPE
    wide = torch.randn(1, N, C + PROJECTION_REST, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    conv = ShortConv(C, K).cuda()
    dy = torch.randn(1, N, C, device="cuda", dtype=torch.bfloat16)
    rows = []
    for impl in ("torch", "fla", "triton"):

        def step(impl=impl):
            y, _ = conv(wide[..., :C], kernel=impl)
            torch.autograd.grad(y, (wide, conv.weight), dy)

        try:
            ms = bench(step)
        except Exception as err:  # fla not installed or not importable: the other rows still run
            print(f"short_conv {impl}: {err!r}"[:300], flush=True)
            continue
        rows.append({"impl": impl, "ms": ms})
        print(rows[-1], flush=True)
        peer = "kernel_ms/short-conv-fla/65536x2304" if impl == "triton" else None
        record.record(f"kernel_ms/short-conv-{impl}/{N}x{C}", ms, "ms", peer=peer)
        record.write()
    RESULTS["short_conv"] = rows
    _print_table("short conv + SiLU, fwd+bwd, bf16 x, fp32 weight", rows, ["impl", "ms"])


def short_conv_tiles() -> None:
    """Each Triton short-conv kernel alone per tile size (module docstring); the fastest per kernel is printed."""
    import itertools

    import triton

    import hydralm.kernels.conv.triton_short_conv as conv
    from hydralm.kernels.fla_modules import fla_short_conv

    N, C, K = SHORT_CONV_SHAPE
    x = torch.randn(1, N, C + PROJECTION_REST, device="cuda", dtype=torch.bfloat16)[..., :C]
    weight = torch.randn(C, 1, K, device="cuda") / 2
    dy = torch.randn(1, N, C, device="cuda", dtype=torch.bfloat16)
    taps = weight.reshape(C, K).contiguous()
    dz, dx = torch.empty_like(dy), torch.empty_like(dy)
    rows_out, forward_tile = [], conv.FORWARD_TILE
    for rows, cols, warps in itertools.product((8, 16, 32), (64, 128, 256), (4, 8)):
        conv.FORWARD_TILE = (rows, cols, warps)
        grid = (triton.cdiv(N, rows), triton.cdiv(C, cols), 1)
        row = {"tile": f"{rows}x{cols}x{warps}", "fwd_ms": bench(lambda: conv.short_conv_forward(x, weight))}
        conv.FORWARD_TILE = forward_tile  # the module's own tile again for whatever runs next

        def dx_kernel(grid=grid, rows=rows, cols=cols, warps=warps):
            conv._conv_bwd_dx_kernel[grid](
                dz, taps, dx, N, C, dx.stride(0), dx.stride(1), K=K, KP=K, ROWS=rows, COLS=cols, num_warps=warps
            )

        row["dx_ms"] = bench(dx_kernel)
        for tiles in (1, 4, 16):  # 1: no loop (triton specialises an int argument of 1), a dw partial per tile
            programs = triton.cdiv(triton.cdiv(N, rows), tiles)
            part = torch.empty(programs, C, K, device="cuda")

            def dz_kernel(programs=programs, part=part, tiles=tiles, rows=rows, cols=cols, warps=warps):
                conv._conv_bwd_dz_kernel[(programs, triton.cdiv(C, cols), 1)](
                    x, taps, dy, dz, part, N, C, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dz.stride(0),
                    tiles, K=K, KP=K, ROWS=rows, COLS=cols, num_warps=warps,
                )  # fmt: skip

            row[f"dz{tiles}_ms"] = bench(dz_kernel)
        rows_out.append(row)
        print(row, flush=True)
    for part in ("fwd_ms", "dz1_ms", "dz4_ms", "dz16_ms", "dx_ms"):
        best = min(rows_out, key=lambda r: r[part])
        print(f"fastest {part}: {best['tile']} {best[part]:.3f} ms", flush=True)
    print(f"fla forward: {bench(lambda: fla_short_conv(x, weight)):.3f} ms", flush=True)
    RESULTS["short_conv_tiles"] = rows_out
    _print_table("Triton short conv kernels by tile (rows x channels x warps), 64k x 2304, bf16", rows_out,
                 ["tile", "fwd_ms", "dz1_ms", "dz4_ms", "dz16_ms", "dx_ms"])  # fmt: skip


def timed_windows(fn, calls: int = 20, warmup: int = 0, sync=torch.cuda.synchronize) -> list:
    """ms per call of `fn` in 5 windows of `calls` calls, after `warmup` untimed calls. Decoding is host-bound
    and host load varies, so callers report the median with the spread rather than one mean."""
    for _ in range(warmup):
        fn()
    windows = []
    for _ in range(5):
        sync()
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        windows.append((time.perf_counter() - started) / calls * 1e3)
    return windows


def main(argv: list) -> int:
    sections = argv or ["layers", "models", "decode"]
    print({"device": torch.cuda.get_device_name(), "torch": torch.__version__}, flush=True)
    for name in sections:
        try:
            runs = {"layers": layers, "models": models, "decode": decode, "claim_models": claim_models}
            runs.update({"decode_batched": decode_batched, "loss": loss, "norm": norm, "swiglu": swiglu})
            runs.update({"state_pass": state_pass, "gdn_parts": gdn_parts})
            runs.update({"rotary": rotary, "short_conv": short_conv, "short_conv_tiles": short_conv_tiles})
            runs[name]()
        except Exception as err:  # a failed section is reported, the others still run
            import traceback

            traceback.print_exc()
            RESULTS[f"{name}_error"] = repr(err)[:300]
        if os.environ.get("OUT"):
            os.makedirs(os.environ["OUT"], exist_ok=True)
            with open(os.path.join(os.environ["OUT"], "speed.json"), "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
