"""Which implementation each op uses, chosen per call from environment switches.

HYDRALM_ATTENTION = auto | torch | flex
    flex: torch's flex_attention for the parallel (training / fresh prefill) path of SWA and retrieval
    layers; auto = flex on CUDA, torch (SDPA / gather) elsewhere. flex has no CPU backward in torch
    2.13, so CPU always uses torch unless asked otherwise for a forward-only check.
HYDRALM_RETRIEVAL = auto | torch | flex | triton
    the parallel retrieval path from scratch: triton = our query-grouped sparse kernels
    (kernels/retrieval/triton_sparse.py, forward and backward); auto = triton on CUDA (flex without triton),
    the gather path on CPU or with HYDRALM_ATTENTION=torch. The fused paths read every chunk exactly: with
    compressive memory, a call whose tokens read a compressed chunk takes the gather path whatever is chosen.
    `python -m benchmarks.gpu_check retrieval` passed on an H200 at 002f736 (router rows, fp32 IEEE / TF32 /
    bf16 outputs and gradients at B2 H4/2 N2048 D64 C64 k8, bit-identical reruns, C2 exactly 0) and, at 3005247,
    at ragged N 3000 / C 32 / MHA too (39/39).
HYDRALM_STREAM_ROUTING = auto | torch | triton
    The routing of retrieval calls that carry a state (chunked prefill, StreamingEngine) on the triton backend.
    triton: one kernel scores each token against the held summaries in its eligible range and keeps a running
    top-k (kernels/retrieval/triton_routing.py), instead of PyTorch scores against every held chunk and a topk
    per block of the call (the largest item of a streaming profile on an H200, 94c54f9). auto = triton on CUDA
    (with triton), torch elsewhere: `HYDRALM_STREAM_ROUTING=triton python -m benchmarks.gpu_check retrieval_stream
    exactness` passed 12/12 on an H200 at 25b0068 (stream logits vs the gather path fp32 1.1e-6, bf16 6.5e-3; C1
    7.4e-5 / 7.8e-5 / 2.1e-4 for the long, memory + GQA and 20-layer models with no retrieval pick differing; C2
    exactly 0; greedy speculative decoding with memory identical to generate).
HYDRALM_DELTANET = auto | torch | triton | fused | fla
    torch: the PyTorch chunkwise kernel (a Python loop over chunks). triton: the same chunkwise algorithm with
    the pass over chunks in our Triton kernels (kernels/delta_rule/triton_state_pass.py), forward and backward.
    fused: the whole chunkwise algorithm in our Triton kernels (kernels/delta_rule/triton_fused.py), forward and
    backward. fla: flash-linear-attention's chunk_gated_delta_rule, only when asked for. fla 0.6 refuses the
    backward on Hopper with triton < 3.7.1 (fla#640), and its forward failed under bf16 autocast in a training
    run's validation on the GPU machine, so auto never picks it: auto = fused on CUDA, torch on CPU.
    fused is 2.3x faster than triton at d 128 (10.6 vs 24.9 ms, H200, 2026-11-28, 90b47f6); its kernels passed
    `GPU_CHECK_DELTANET=fused python -m benchmarks.gpu_check delta_rule` (54/54, d 64 / 100 / 128, fp32 IEEE and
    TF32, bf16) on an H200 on 2026-11-30 at c378ec3.

HYDRALM_GDN_MODULES = auto | torch | fla
    The elementwise parts of a Gated DeltaNet block around the delta rule: the q/k L2 norm, the gated output RMSNorm and
    the short causal conv where HYDRALM_SHORT_CONV leaves it to this switch (off CUDA). fla:
    flash-linear-attention's Triton kernels for them (kernels/fla_modules.py), on CUDA for calls without a carried
    conv state. torch: our PyTorch forms. auto = fla on CUDA when fla-core is importable, torch elsewhere:
    `HYDRALM_GDN_MODULES=fla python -m benchmarks.gpu_check gdn_block` (the 160m block with fla's modules vs the
    PyTorch ones in fp32: output, final state, input and parameter gradients) passed 27/27 on an H200 at 94c54f9
    (fp32 <= 1.6e-6, bf16 <= 1.0e-2, the PyTorch modules' own bf16 error 1.0e-2). train.py at 16k x 4 ran 123.5
    ktok/s with them, 90.1 without; fla autotunes its kernels in a process's first calls (that run's start took
    about 30 s longer).

HYDRALM_SHORT_CONV = auto | torch | fla | triton
    The short causal conv (with its SiLU) of Gated DeltaNet blocks. triton: one Triton kernel forward and two
    backward (kernels/conv/triton_short_conv.py) that read x at its row stride (the slice of the input projection's
    output) and keep only x and the weight, for calls without a carried conv state, and the forward alone after one
    when no gradient is wanted (chunked prefill, streaming); fla: fla's causal_conv1d, calls without a state only;
    torch: the PyTorch form (cuDNN's conv1d and silu, recomputed in backward). auto = triton on CUDA (with triton),
    else what HYDRALM_GDN_MODULES picks (torch off CUDA): `python -m benchmarks.gpu_check short_conv` passed 16/16
    on an H200 at 3e5d3f2 (fp32 <= 1.7e-7, bf16 <= 2.4e-3, the cached forward included); fwd+bwd at 64k x 2304
    took 1.41 ms there against fla's 2.35, and one Gated DeltaNet layer + MLP 15.8 ms against fla's 14.4 at 16k
    (1.10x; 16.8 with fla's conv, bfd7b63).

HYDRALM_NORM = auto | torch | triton
    The RMSNorms of training forwards (the blocks' two norms, the final norm, the MTP heads' norms; not the
    gated norm): triton = one Triton kernel forward and one backward per call (kernels/norm/triton_rmsnorm.py)
    instead of about sixteen fp32 PyTorch passes over the (tokens, d_model) tensor; same arithmetic and the same
    kept tensors. auto = triton on CUDA (with triton), torch elsewhere: `python -m benchmarks.gpu_check rmsnorm`
    passed 18/18 on an H200 at 76b7d10 (fp32 <= 1.5e-7, bf16 <= 2.4e-3 of fp64), and one block norm at 64k tokens
    x d 768 (fp32 residual under bf16 autocast, fwd+bwd) took 0.418 ms against the PyTorch form's 1.98 ms there.

HYDRALM_SWIGLU = auto | torch | triton
    SwiGLU's elementwise part in training forwards (silu(gate) * up and its gradient, around the down
    projection): triton = one Triton kernel forward and one backward per call on the whole gate_up output
    (kernels/activation/triton_swiglu.py) instead of silu and a mul forward, and backward their recomputation,
    silu_backward, two muls and the cat of the two halves' gradients; same arithmetic and the same kept tensors.
    auto = triton on CUDA (with triton), torch elsewhere: `python -m benchmarks.gpu_check swiglu` passed 12/12 on
    an H200 at fd49f69 (fp32 <= 1.6e-6, bf16 autocast <= 2.9e-3 of fp64; 64k x 2048 and ragged 3001 x 1000), and
    SwiGLU's down part at 64k tokens x hidden 2048 (fwd+bwd, bf16) took 1.43 ms against 3.43 ms for the PyTorch
    form (`python -m benchmarks.speed swiglu`).

HYDRALM_ROTARY = auto | torch | triton
    The rotary embedding of q and k in training forwards of the attention layers (sliding-window, full): triton =
    one Triton kernel forward and one backward per call (kernels/rotary/triton_rotary.py) that reads x at its
    strides and the (N, D/2) cos / sin tables once, instead of the PyTorch form's cats, neg and about seven fp32
    passes each way; same arithmetic. auto = triton on CUDA (with triton), torch elsewhere: `python -m
    benchmarks.gpu_check rotary` passed 8/8 on an H200 at 779bcca (fp32 <= 3.1e-8, bf16 <= 1.7e-3 of fp64; B1 H12
    N65536 D64 and ragged B2 H3 N3001 D128), and q and k at 64k tokens x 12 heads x 64 (fwd+bwd, bf16 strided
    views) took 0.733 ms against 4.46 ms for the PyTorch form (`python -m benchmarks.speed rotary`).

HYDRALM_DECODE = auto | torch | fused
    The one-token step of Gated DeltaNet layers (decoding, StaticDecoder graphs, speculative drafts). fused: one
    Triton kernel per layer and token from the input projection's output to the output projection's input
    (kernels/delta_rule/triton_decode.py) instead of a few dozen small PyTorch kernels; fp32 states only (an
    fp64 state takes the PyTorch step). auto = fused on CUDA (with triton), torch elsewhere:
    `HYDRALM_DECODE=fused python -m benchmarks.gpu_check decode_fused static_decode spec_decode` passed on an
    H200 at 8e6833c (fp32 6.3e-7, bf16 4.9e-3; the CUDA-graph decoder within 7.2e-7 of `model.step`). On a
    StaticDecoder's own buffers the kernel writes the new state and conv cache in place (no copy back per layer);
    `static_decode` passed with that at 75fc635 (8.9e-7).

HYDRALM_DECODE_MANY = auto | torch | fused | looped
    The multi-token step of Gated DeltaNet layers (`step_many`: verifying k + 1 tokens in speculative decoding).
    fused: one input projection for the T tokens, then each token's conv, gates, delta rule and gated norm in
    HYDRALM_DECODE's fused kernel (T launches per layer instead of a few dozen PyTorch ops per token); fp32
    states only. auto = fused on CUDA (with triton), torch elsewhere: `HYDRALM_DECODE_MANY=fused python -m
    benchmarks.gpu_check spec_decode` passed 4/4 on an H200 at 25b0068 (verify graph 7.4e-7 and commit graph
    3.8e-6 of decode steps, greedy self-draft on graphs identical to greedy generate). looped: the T tokens in one
    launch of a kernel that keeps the state in registers from token to token and writes each token's state into
    the trail (kernels/delta_rule/triton_decode.py, ``gated_deltanet_steps_fused``): one launch a layer instead of T
    and a stack of the T states, bit for bit what T launches of the fused step give (tests/test_gdn_decode_fused.py);
    asked by name only until `HYDRALM_DECODE_MANY=looped python -m benchmarks.gpu_check spec_decode` has passed.

HYDRALM_DECODE_VERIFY = auto | torch | kernels
    Speculative verification of the retrieval and sliding-window layers on a StaticDecoder's buffers (``verify``,
    ``commit``, ``greedy_round``). kernels: the T tokens run as T in-place steps of the layer's step kernels
    (HYDRALM_RETRIEVAL_DECODE / HYDRALM_SWA_DECODE = triton), the slots they write are saved before and written
    back after, and a retrieval layer's commit replays the kept tokens with its ring-update kernel: verify logits
    and committed states are the decode steps' bit for bit (tests/test_kernel_verify.py), so greedy
    self-drafting emits what greedy ``generate`` does even where logits nearly tie. torch: one PyTorch pass over
    the T tokens (another summation order than the step kernels: at 6aa3407 greedy self-drafting on the random
    160m model diverged from ``generate`` within 512 tokens, and ran 0.98x its speed). auto = torch until
    `HYDRALM_DECODE_VERIFY=kernels python -m benchmarks.gpu_check spec_decode` passes on a GPU; asked by name,
    kernels wherever the step kernels run (Triton's interpreter on a CPU).

HYDRALM_RETRIEVAL_DECODE = auto | torch | triton
    The one-token step of retrieval layers. triton: routing, top-k and the attention over the picked chunks and
    the local context in three Triton kernels that read the rings in place (kernels/retrieval/triton_decode.py:
    scores per block of slots, one program per pick or local chunk, a merge by log-sum-exp), instead of about
    twenty PyTorch kernels and gathered copies of the picked chunks. auto = triton on CUDA (with triton) for at most
    DECODE_KERNEL_ROWS (64) rows, torch elsewhere: `HYDRALM_RETRIEVAL_DECODE=triton python -m benchmarks.gpu_check
    retrieval_decode static_decode` passed on an H200 at 27be1e9 (the PyTorch step's logits within 4.2e-7 fp32,
    6.5e-3 bf16; the StaticDecoder eager and as a CUDA graph within 1.4e-6 of `model.step`), and again with every
    decode switch below at 75fc635; batch-1 decode of the 160m model after 4k tokens ran 1135 tok/s with it against
    1010 without (`speed decode_batched`). An earlier one-program-per-(row, head) version was slower (834.8 against
    1043.8 tok/s, 55d1790) and 5x slower at batch 64. With it, a StaticDecoder's step also writes a completing
    chunk into the rings in place with one kernel (kernels/retrieval/triton_ring_update.py) at any row count; the
    same checks passed at 6aa3407 (5.95e-7), and the 160m graph step after 4k tokens ran 1584 tok/s at batch 1,
    5202 at batch 8 and 42.3k at batch 64 with both attention kernels, against 27.3k at batch 64 on the PyTorch
    steps, so DECODE_KERNEL_ROWS is 64 since then.

HYDRALM_SWA_DECODE = auto | torch | triton
    The attention of the one-token step of sliding-window layers (after the ring write). triton: two Triton
    kernels that read the ring in place, each query head its key head by index (kernels/attention/triton_decode.py:
    one program per (row, head, block of 64 slots), a merge by log-sum-exp), instead of repeat_kv's copies of the
    ring, the mask of the written slots and SDPA on one query; fp32 / bf16 / fp16 only. auto = triton on CUDA (with
    triton) for at most DECODE_KERNEL_ROWS rows, torch elsewhere: `python -m benchmarks.gpu_check swa_decode
    static_decode` (every decode switch set) passed on an H200 at 75fc635 (the PyTorch step's logits within 3.9e-7
    fp32, 6.4e-3 bf16, MHA and GQA; the StaticDecoder eager and as a CUDA graph within 8.9e-7 of `model.step`), and
    batch-1 decode after 4k tokens went from 1256 to 1303 tok/s with it (the folds and the retrieval kernel on in
    both; `speed decode_batched`, same run); timed at 8 and 64 rows with the retrieval kernel above.

HYDRALM_DECODE_LINEAR = auto | torch | gemv | fused
    The matmuls of a decode step (bias-free projections called without autograd on at most 16 rows). gemv: one
    Triton kernel that streams each weight once over many programs (kernels/linear/triton_gemv.py) instead of
    cuBLAS's many-row tiles; `HYDRALM_DECODE_LINEAR=gemv python -m benchmarks.gpu_check decode_linear
    static_decode` passed on an H200 at 94c54f9 (fp32 9.7e-8, bf16 1.7e-3 of fp64 F.linear; the CUDA-graph decoder
    within 3.5e-7 of `model.step`); the 160m graph step went from 1.15 to 1.09 ms (`profile_decode 160m 8192 0
    compile`). fused: gemv with the elementwise ops around a block's projections folded into them (the block's
    RMSNorm into the mixer's and the MLP's first projection, SwiGLU's product into the down projection, the
    residual adds into the mixer's and the MLP's last; the final norm into the LM head, an MTP module's output norm
    into its head), about three kernels fewer per layer and step. auto = fused on CUDA (with triton), torch
    elsewhere: `HYDRALM_DECODE_LINEAR=fused python -m benchmarks.gpu_check decode_linear` passed on an H200 at
    27be1e9 (folds vs fp64: fp32 1.1e-7, bf16 2.5e-3; every row of 3- and 16-row calls bit-identical to one-row
    calls) and `static_decode` with every decode switch at 75fc635 (above); batch-1 decode after 4k tokens ran 982
    tok/s with the folds alone at 27be1e9, where the record's figure for gemv is 1010 (another run), and 1256 with
    the folds and the retrieval kernel at 75fc635: the folds alone were not faster in that comparison across runs,
    the set of decode switches that auto now picks was (1303 against 1010 tok/s). `spec_decode` was not rerun with
    the folds.

HYDRALM_CROSS_ENTROPY = auto | torch | triton | liger | fla
    The training loss (kernels/cross_entropy/). torch: our chunked linear + cross-entropy in PyTorch (the
    logits are recomputed in backward, never held for the whole batch). triton: the same chunks with their
    elementwise steps (logsumexp; softmax - onehot, scale, cast) in two Triton kernels, one pass over each
    chunk's logits instead of about seven (kernels/cross_entropy/triton_softmax.py). liger / fla: liger-kernel's
    or flash-linear-attention's fused Triton kernels, only when asked (optional dependencies, CUDA only).
    auto = triton on CUDA (with triton), torch elsewhere: `python -m benchmarks.gpu_check cross_entropy` passed
    14/14 on an H200 at 5694f05 (triton and fla against the fp64 full-logits loss: fp32 <= 7.7e-7, bf16 <= 2.7e-3;
    an all-ignored batch gives 0, finite, for both there), and the LM head's linear + loss over 64k rows x 32,000
    ids (fwd+bwd, bf16) took 29.8 ms with triton against 71.1 ms for torch and 80.5 ms for fla
    (`python -m benchmarks.speed loss`).

HYDRALM_DELTANET_RECOMPUTE = 1 | 0
    1 (default): the fused delta-rule kernels keep only their inputs for backward and rebuild the per-chunk WY
    factors and states there (one more prep and state pass per layer; fla's kernels work this way) instead of
    storing five fp32 per-chunk tensors, about 15 KiB per token at H 12, D 64. train.py model=160m at 16k x 4
    on an H200 (with the blocked inverse, c7704b2): 39.6 GiB at 123.4 ktok/s, against 49.0 GiB at 126.2 with 0
    (74f65af). Checked together with the blocked inverse (below).

HYDRALM_DELTANET_BLOCKED_INVERSE = 1 | 0
    1 (default): the fused prep kernel inverts each chunk's (I + A) in 16 x 16 blocks (the four diagonal blocks
    as products (I + N)(I + N^2)(I + N^4)(I + N^8), N = -A_ii, and a block recurrence in small IEEE dots, as
    fla's solve_tril) instead of one 64-step substitution over the whole 64 x 64 tile; chunk size 64 only (other
    sizes substitute). The products replaced four 16-step substitutions at 701c80f: the prep kernel at B4 T16384
    H12 K64 took 0.79 ms instead of 1.40 (H200), and `GPU_CHECK_DELTANET=fused gpu_check delta_rule` (D 64 and
    D 128) passed 36/36 with it, `gpu_check state_pass` 36/36. The fused kernels at
    B16 T2048 H12 K64 (fwd+bwd, bf16, H200, c7704b2): 2.93 ms with it, 3.79 ms without (fla's 2.29 / 2.93 ms in
    the same runs). Both switches were checked together by `HYDRALM_DELTANET_BLOCKED_INVERSE=1
    HYDRALM_DELTANET_RECOMPUTE=1 GPU_CHECK_DELTANET=fused python -m benchmarks.gpu_check delta_rule`: 54/54 on
    an H200 (the D 64 shape at c7704b2, D 128 and D 100 at 15a1d16; fp32 IEEE <= 7.8e-7, TF32 <= 1.9e-3, bf16
    <= 3.9e-3 of the fp64 reference).

HYDRALM_DELTANET_DOT16 = 0 | 1
    1: with bf16 (fp16) inputs the fused delta-rule kernels round both operands of their dots to bf16 (fp16)
    and accumulate in fp32, as fla's kernels do, instead of TF32 dots on fp32 tiles; the chunk inverse and
    the products of segment maps stay fp32. Off by default: it has not yet passed `gpu_check delta_rule` on
    a GPU (`HYDRALM_DELTANET_DOT16=1 GPU_CHECK_DELTANET=fused python -m benchmarks.gpu_check delta_rule`), and
    `BENCH_KERNEL_DOT16=1 python -m benchmarks.peers kernel` times it beside the default. Why: at B8 T4096 H16
    K128 the fused kernels take 10.1 ms against fla's 3.96 (H200, 18f8740), each kernel about 2.5x fla's
    counterpart, and their column blocks do not change that (docs/benchmarks.md). The CPU tests run it with
    fp16 inputs (Triton's interpreter computes bf16 dots wrongly).

HYDRALM_DELTANET_COMPILE = 0 | 1
    1: training forwards on the triton backend run delta_rule_chunkwise under torch.compile (one compile per
    shape; fuses the elementwise prep around the Triton pass). Off by default: the 160m model trained 1.14x /
    1.10x faster with it at 4k / 16k context but 0.94x at 64k (H200, 2026-11-28, 0d7196f; CHANGELOG.md).

HYDRALM_DELTANET_PACKED = 0 | 1
    1 (default on CUDA): Gated DeltaNet layers hand q, k, v to the delta rule as the one (B, T, 3, H, d) tensor
    their short conv wrote, q and k raw (`chunk_gated_delta_rule_packed`). The fused kernels then L2-normalise q
    and k on the rows they load (x / sqrt(sum x^2 + 1e-6), fla's l2norm; d_k <= 64), write o head-last and the
    gradient of q, k, v as one head-last tensor: a layer runs no l2norm kernels, no contiguous copies of q, k or
    o and no stack of the q / k / v gradients. Other backends unpack and normalise in PyTorch. On an H200
    (bfd7b63) `GPU_CHECK_DELTANET=fused gpu_check delta_rule` (D 64, D 128) passed 36/36 and `gpu_check qk_norm`
    (packed and unpacked, fp32 / TF32 / bf16) 36/36; one GDN layer + MLP (fwd+bwd, `peers layer`) took 16.80 ms
    at 16k x 4 and 16.36 ms at 64k x 1 with it, 17.97 / 17.66 ms without (701c80f). The kernels alone are
    0.3 ms slower packed (`speed gdn_parts`: 7.60 vs 7.28 ms at 16k x 4); the layer gains the copies.
    0 (default elsewhere): the layer splits and normalises q, k, v itself (equal within 3e-6 in the CPU
    interpreter).

`auto` never picks a path that is wrong on the machine it runs on: flex and fla are compared with the
reference kernels on the GPU by `python -m benchmarks.gpu_check`.
"""

import functools
import importlib
import os

from hydralm.kernels.triton_common import interpreting, triton_available

ATTENTION_CHOICES = ("auto", "torch", "flex")
RETRIEVAL_CHOICES = ("auto", "torch", "flex", "triton")
DELTANET_CHOICES = ("auto", "torch", "triton", "fused", "fla")
CROSS_ENTROPY_CHOICES = ("auto", "torch", "triton", "liger", "fla")
DECODE_CHOICES = ("auto", "torch", "fused")
DECODE_LINEAR_CHOICES = ("auto", "torch", "gemv", "fused")
DECODE_MANY_CHOICES = ("auto", "torch", "fused", "looped")
DECODE_VERIFY_CHOICES = ("auto", "torch", "kernels")
RETRIEVAL_DECODE_CHOICES = ("auto", "torch", "triton")
SWA_DECODE_CHOICES = ("auto", "torch", "triton")
STREAM_ROUTING_CHOICES = ("auto", "torch", "triton")
GDN_MODULES_CHOICES = ("auto", "torch", "fla")
SHORT_CONV_CHOICES = ("auto", "torch", "fla", "triton")
NORM_CHOICES = ("auto", "torch", "triton")
SWIGLU_CHOICES = ("auto", "torch", "triton")
ROTARY_CHOICES = ("auto", "torch", "triton")


def _choice(variable: str, choices: tuple) -> str:
    value = os.environ.get(variable, "auto").lower()
    if value not in choices:
        raise ValueError(f"{variable}={value!r} is invalid: expected one of {list(choices)}")
    return value


def _triton_usable(is_cuda: bool) -> bool:
    """Our Triton kernels can run: on CUDA, or off it in Triton's CPU interpreter (TRITON_INTERPRET=1, the tests)."""
    return triton_available() and (is_cuda or interpreting())


def _require_triton(variable: str, value: str, is_cuda: bool, fallback: str) -> None:
    """One error for a switch that asks for a Triton path where none can run."""
    if not _triton_usable(is_cuda):
        raise RuntimeError(
            f"{variable}={value} needs the `triton` package and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
            f"unset it to use {fallback}"
        )


def _flag(variable: str, default: str = "0") -> bool:
    """A 0 | 1 switch."""
    value = os.environ.get(variable, default)
    if value not in ("0", "1"):
        raise ValueError(f"{variable}={value!r} is invalid: expected '0' or '1'")
    return value == "1"


def attention_backend(is_cuda: bool) -> str:
    """'flex' or 'torch' for the parallel attention paths."""
    choice = _choice("HYDRALM_ATTENTION", ATTENTION_CHOICES)
    if choice == "auto":
        return "flex" if is_cuda else "torch"
    return choice


def retrieval_backend(is_cuda: bool) -> str:
    """'triton', 'flex' or 'torch' for the parallel retrieval path from scratch (training, fresh prefill)."""
    choice = _choice("HYDRALM_RETRIEVAL", RETRIEVAL_CHOICES)
    if choice == "triton":
        _require_triton("HYDRALM_RETRIEVAL", choice, is_cuda, "the default path")
    if choice == "auto":  # our Triton kernels on CUDA: `gpu_check retrieval` passed on an H200 at 002f736
        if attention_backend(is_cuda) != "flex":  # HYDRALM_ATTENTION=torch (or a CPU) keeps the gather path
            return "torch"
        return "triton" if triton_available() else "flex"
    return choice


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:  # not installed, or its triton does not import
        return False
    return True


@functools.lru_cache(maxsize=1)
def fla_modules_available() -> bool:
    try:
        import fla.modules  # noqa: F401
    except Exception:  # not installed, or its triton does not import
        return False
    return True


def gdn_modules_backend(is_cuda: bool) -> str:
    """'fla' or 'torch' for the short conv, L2 norm and gated RMSNorm of Gated DeltaNet blocks."""
    choice = _choice("HYDRALM_GDN_MODULES", GDN_MODULES_CHOICES)
    if choice == "torch":
        return "torch"
    usable = is_cuda and fla_modules_available()
    if choice == "fla" and not usable:
        raise RuntimeError(
            "HYDRALM_GDN_MODULES=fla needs a CUDA device and flash-linear-attention (fla-core) importable; unset "
            "it to use the PyTorch modules"
        )
    return "fla" if usable else "torch"  # auto: fla's on CUDA once their GPU check passed (module docstring)


def short_conv_backend(is_cuda: bool) -> str:
    """'triton', 'fla' or 'torch' for Gated DeltaNet blocks' short conv (ShortConv.forward says which calls)."""
    choice = _choice("HYDRALM_SHORT_CONV", SHORT_CONV_CHOICES)
    if choice == "auto":  # ours on CUDA (module docstring), else the PyTorch form or fla's
        return "triton" if is_cuda and triton_available() else gdn_modules_backend(is_cuda)
    if choice == "fla" and not (is_cuda and fla_modules_available()):
        raise RuntimeError(
            "HYDRALM_SHORT_CONV=fla needs a CUDA device and flash-linear-attention (fla-core) importable; unset it "
            "to use the default"
        )
    if choice == "triton":
        _require_triton("HYDRALM_SHORT_CONV", choice, is_cuda, "the default")
    return choice


@functools.lru_cache(maxsize=1)
def fla_backward_safe() -> bool:
    """fla#640: the GDN backward is refused / wrong on Hopper with triton < 3.7.1."""
    try:
        import triton
    except ImportError:
        return False
    version = tuple(int(part) for part in triton.__version__.split(".")[:3] if part.isdigit())
    return version >= (3, 7, 1)


def deltanet_backend(is_cuda: bool, needs_grad: bool) -> str:
    """'fla', 'fused', 'triton' or 'torch' for the chunkwise delta rule."""
    choice = _choice("HYDRALM_DELTANET", DELTANET_CHOICES)
    if choice == "torch":
        return "torch"
    fla_usable = is_cuda and fla_available() and (not needs_grad or fla_backward_safe())
    triton_usable = _triton_usable(is_cuda)
    if choice == "fla" and not fla_usable:
        raise RuntimeError(
            "HYDRALM_DELTANET=fla but fla cannot run this call safely (needs CUDA, flash-linear-attention, and "
            "triton >= 3.7.1 for gradients: fla#640); unset it to use the PyTorch kernel"
        )
    if choice in ("triton", "fused"):
        _require_triton("HYDRALM_DELTANET", choice, is_cuda, "the PyTorch kernel")
    if choice in ("fla", "triton", "fused"):
        return choice
    # auto: our fused Triton kernels on CUDA. fla's forward is not picked by auto: under bf16 autocast its
    # recompute_w_u kernel failed on the GPU machine (fp32 A against bf16 v).
    return "fused" if triton_usable and is_cuda else "torch"


def norm_backend(is_cuda: bool) -> str:
    """'triton' or 'torch' for the RMSNorms of training forwards."""
    return _checked_triton_path("HYDRALM_NORM", NORM_CHOICES, "triton", is_cuda, "the PyTorch norm")


def swiglu_backend(is_cuda: bool) -> str:
    """'triton' or 'torch' for SwiGLU's product in training forwards."""
    return _checked_triton_path("HYDRALM_SWIGLU", SWIGLU_CHOICES, "triton", is_cuda, "the PyTorch product")


def rotary_backend(is_cuda: bool) -> str:
    """'triton' or 'torch' for the rotary embedding in training forwards."""
    return _checked_triton_path("HYDRALM_ROTARY", ROTARY_CHOICES, "triton", is_cuda, "the PyTorch rotation")


def decode_backend(is_cuda: bool) -> str:
    """'fused' or 'torch' for the one-token step of Gated DeltaNet layers."""
    return _checked_triton_path("HYDRALM_DECODE", DECODE_CHOICES, "fused", is_cuda, "the PyTorch step")


# Rows (batch size) up to which auto picks the decode step kernels of retrieval and SWA layers: they were timed on
# an H200 at batch 1 (module docstring); larger batches keep the PyTorch steps until timed there.
DECODE_KERNEL_ROWS = 64  # the largest batch the decode kernels were timed at against the PyTorch steps


def retrieval_decode_backend(is_cuda: bool, rows: int = 1) -> str:
    """'triton' or 'torch' for the one-token step of retrieval layers over `rows` batch rows."""
    return _decode_kernel_path("HYDRALM_RETRIEVAL_DECODE", RETRIEVAL_DECODE_CHOICES, is_cuda, rows)


def swa_decode_backend(is_cuda: bool, rows: int = 1) -> str:
    """'triton' or 'torch' for the attention of the one-token step of sliding-window layers over `rows` rows."""
    return _decode_kernel_path("HYDRALM_SWA_DECODE", SWA_DECODE_CHOICES, is_cuda, rows)


def _decode_kernel_path(name: str, choices: tuple, is_cuda: bool, rows: int) -> str:
    """A checked Triton path (`_checked_triton_path`) whose auto also stops above DECODE_KERNEL_ROWS rows."""
    if rows > DECODE_KERNEL_ROWS and _choice(name, choices) == "auto":
        return "torch"
    return _checked_triton_path(name, choices, "triton", is_cuda, "the PyTorch step")


def decode_linear_backend(is_cuda: bool) -> str:
    """'fused', 'gemv' or 'torch' for the few-row matmuls of decode steps (auto: fused on CUDA)."""
    if _choice("HYDRALM_DECODE_LINEAR", DECODE_LINEAR_CHOICES) == "gemv":
        _require_triton("HYDRALM_DECODE_LINEAR", "gemv", is_cuda, "F.linear")
        return "gemv"
    return _checked_triton_path("HYDRALM_DECODE_LINEAR", DECODE_LINEAR_CHOICES, "fused", is_cuda, "F.linear")


def stream_routing_backend(is_cuda: bool) -> str:
    """'triton' or 'torch' for the routing of retrieval calls with a state."""
    return _checked_triton_path(
        "HYDRALM_STREAM_ROUTING", STREAM_ROUTING_CHOICES, "triton", is_cuda, "the PyTorch routing"
    )


def decode_many_backend(is_cuda: bool) -> str:
    """'looped' (asked by name: its GPU check has not run yet), 'fused' or 'torch' for the multi-token step of Gated
    DeltaNet layers."""
    if _choice("HYDRALM_DECODE_MANY", DECODE_MANY_CHOICES) == "looped":
        _require_triton("HYDRALM_DECODE_MANY", "looped", is_cuda, "the PyTorch loop")
        return "looped"
    return _checked_triton_path("HYDRALM_DECODE_MANY", DECODE_MANY_CHOICES, "fused", is_cuda, "the PyTorch loop")


def decode_verify_backend() -> str:
    """'kernels' (asked by name: its GPU check has not run yet) or 'torch' for speculative verification of the
    retrieval and SWA layers on a StaticDecoder's buffers (the layers also need their step kernels on)."""
    return "kernels" if _choice("HYDRALM_DECODE_VERIFY", DECODE_VERIFY_CHOICES) == "kernels" else "torch"


def _checked_triton_path(name: str, choices: tuple, path: str, is_cuda: bool, instead: str) -> str:
    """`path` (a Triton path whose GPU check has passed: module docstring) for auto on CUDA or when asked by name;
    'torch' when asked, or for auto without CUDA or triton."""
    choice = _choice(name, choices)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return path if is_cuda and _triton_usable(is_cuda) else "torch"
    _require_triton(name, choice, is_cuda, instead)
    return path


def deltanet_recompute() -> bool:
    return _flag("HYDRALM_DELTANET_RECOMPUTE", default="1")


def deltanet_blocked_inverse() -> bool:
    return _flag("HYDRALM_DELTANET_BLOCKED_INVERSE", default="1")


def deltanet_packed(is_cuda: bool) -> bool:
    return _flag("HYDRALM_DELTANET_PACKED", default="1" if is_cuda else "0")


def deltanet_dot16() -> bool:
    return _flag("HYDRALM_DELTANET_DOT16")


def deltanet_compile() -> bool:
    return _flag("HYDRALM_DELTANET_COMPILE")


def cross_entropy_backend(is_cuda: bool) -> str:
    """'torch', 'triton', 'liger' or 'fla' for the linear + cross-entropy of the training loss."""
    choice = _choice("HYDRALM_CROSS_ENTROPY", CROSS_ENTROPY_CHOICES)
    if choice in ("auto", "torch", "triton"):
        name = "HYDRALM_CROSS_ENTROPY"
        return _checked_triton_path(name, CROSS_ENTROPY_CHOICES, "triton", is_cuda, "the PyTorch loss")
    module = {"liger": "liger_kernel.transformers.functional", "fla": "fla.modules.fused_linear_cross_entropy"}
    try:
        importlib.import_module(module[choice])
    except Exception as err:  # not installed, or its triton does not import
        raise RuntimeError(
            f"HYDRALM_CROSS_ENTROPY={choice} but {module[choice]} does not import ({err}); unset it to use the "
            "PyTorch chunked loss"
        ) from None
    if not is_cuda:
        raise RuntimeError(f"HYDRALM_CROSS_ENTROPY={choice} needs a CUDA device; unset it to use the PyTorch loss")
    return choice
