"""A retrieval layer's ring update after a decode step, as one Triton kernel, in place (with
HYDRALM_RETRIEVAL_DECODE=triton, on a StaticDecoder's own buffers).

The PyTorch step (``RetrievalAttention._complete_chunk``) writes a completing chunk into the bank with masked
writes, so that every step has the same shapes and kernels: each step compresses the chunk leaving the exact
window, writes the pool, the bank and both summaries and clears the chunk in progress, and keeps the old values
unless the chunk completes (one step in C). Compiled, that is about twenty small kernels a layer and token, most
of the glue of a batch-1 decode step (docs/benchmarks.md). Here one program per (row, key head) reads the stream
position and returns at once unless the token completes chunk c; then, in this order,

    with memory and c >= S: pool slot (c - S) % P <- compress(bank slot c % S), its summary too
    bank slot c % S <- the chunk in progress;  its summary <- the chunk's mean key (fp32)
    the chunk in progress <- 0

the same values as the PyTorch step (the test oracle, tests/test_retrieval_ring_update.py), summed in another
order. A program reads its (row, key head) slices before it writes them and no other program touches them.
"""

import torch

from hydralm.kernels.triton_common import tl, triton

if triton is not None:

    @triton.jit
    def _complete_chunk_kernel(
        buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries, pool_query, pos_ptr,
        H_KV, S, P, D, scale,
        C: tl.constexpr, R: tl.constexpr, CP: tl.constexpr,
        BC: tl.constexpr, BCP: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        rk = tl.program_id(0).to(tl.int64)  # row * H_KV + key head: the rings' leading index
        pos = tl.load(pos_ptr)
        c = pos // C
        if pos % C == C - 1:
            slot = c % S
            d = tl.arange(0, BD)
            if P > 0:
                if c >= S:  # chunk c - S leaves the exact window: attention pooling of each R keys into one slot
                    cp, r = tl.arange(0, BCP), tl.arange(0, BR)
                    rows3 = (rk * S + slot) * C + cp[:, None, None] * R + r[None, :, None]
                    mask3 = (cp < CP)[:, None, None] & (r < R)[None, :, None] & (d < D)[None, None, :]
                    k3 = tl.load(bank_k + rows3 * D + d[None, None, :], mask=mask3, other=0.0).to(tl.float32)
                    v3 = tl.load(bank_v + rows3 * D + d[None, None, :], mask=mask3, other=0.0).to(tl.float32)
                    w = tl.load(pool_query + (rk % H_KV) * D + d, mask=d < D, other=0.0).to(tl.float32)
                    logits = tl.sum(k3 * w[None, None, :], 2) * scale
                    logits = tl.where((r < R)[None, :], logits, float("-inf"))
                    weights = tl.exp(logits - tl.max(logits, 1)[:, None])
                    weights = weights / tl.sum(weights, 1)[:, None]
                    pool_slot = (c - S) % P
                    out = ((rk * P + pool_slot) * CP + cp)[:, None] * D + d[None, :]
                    mask2 = (cp < CP)[:, None] & (d < D)[None, :]
                    ck = tl.sum(weights[:, :, None] * k3, 1)
                    cv = tl.sum(weights[:, :, None] * v3, 1)
                    tl.store(pool_k + out, ck.to(pool_k.dtype.element_ty), mask=mask2)
                    tl.store(pool_v + out, cv.to(pool_v.dtype.element_ty), mask=mask2)
                    summary = tl.load(summaries + (rk * S + slot) * D + d, mask=d < D, other=0.0)
                    tl.store(pool_summaries + (rk * P + pool_slot) * D + d, summary, mask=d < D)
            rc = tl.arange(0, BC)
            mask = (rc < C)[:, None] & (d < D)[None, :]
            chunk = (rk * C + rc)[:, None] * D + d[None, :]
            held = ((rk * S + slot) * C + rc)[:, None] * D + d[None, :]
            k = tl.load(buf_k + chunk, mask=mask, other=0.0)
            v = tl.load(buf_v + chunk, mask=mask, other=0.0)
            tl.store(bank_k + held, k, mask=mask)
            tl.store(bank_v + held, v, mask=mask)
            tl.store(summaries + (rk * S + slot) * D + d, tl.sum(k.to(tl.float32), 0) / C, mask=d < D)
            tl.store(buf_k + chunk, tl.zeros_like(k), mask=mask)
            tl.store(buf_v + chunk, tl.zeros_like(v), mask=mask)


@torch.library.custom_op(
    "hydralm::retrieval_complete_chunk_",
    mutates_args=("buf_k", "buf_v", "bank_k", "bank_v", "summaries", "pool_k", "pool_v", "pool_summaries"),
)
def retrieval_complete_chunk_(
    buf_k: torch.Tensor,
    buf_v: torch.Tensor,
    bank_k: torch.Tensor,
    bank_v: torch.Tensor,
    summaries: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    pool_summaries: torch.Tensor,
    pool_query: torch.Tensor,
    pos: torch.Tensor,
) -> None:
    """After the token at stream position `pos` (a 0-d int64 tensor, the same for every row) was written into
    buf_k / buf_v (B, H_kv, C, D): if it completes its chunk, the chunk joins the bank ring (B, H_kv, S, C, D) and
    its fp32 summaries (B, H_kv, S, D), and with a pool (B, H_kv, P, C / r, D; P may be 0) the chunk it displaces
    is compressed into it by attention pooling with `pool_query` (H_kv, D). Every tensor is written in place and
    must be contiguous."""
    tensors = (buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("retrieval_complete_chunk_ writes the rings in place: every ring must be contiguous")
    B, h_kv, S, C, D = bank_k.shape
    P, CP = pool_k.shape[2], max(pool_k.shape[3], 1)
    if P and C % CP:
        raise ValueError(f"a pooled chunk of {CP} slots does not divide the chunk size {C}")
    R = C // CP
    _complete_chunk_kernel[(B * h_kv,)](
        buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries, pool_query.contiguous(),
        pos.reshape(1).to(torch.int64), h_kv, S, P, D, D**-0.5,
        C=C, R=R, CP=CP, BC=triton.next_power_of_2(C), BCP=triton.next_power_of_2(CP), BR=triton.next_power_of_2(R),
        BD=triton.next_power_of_2(D),
    )  # fmt: skip


@retrieval_complete_chunk_.register_fake
def _(buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries, pool_query, pos):
    return None
