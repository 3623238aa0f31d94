"""One decode step of retrieval attention as one Triton kernel (backend HYDRALM_RETRIEVAL_DECODE=triton).

The PyTorch step (``RetrievalAttention.step``) scores the token's query against the summaries of the held chunks
(two fp32 matmuls, pool and bank), picks the top k with a sort-based top-k, gathers the picked chunks' keys and
values into new tensors and runs SDPA over them and the local context: about twenty kernels per layer and token,
and at batch 64 the gathered copies and SDPA are most of the decode step's GPU time (docs/benchmarks.md). Here one
program per (row, query head) does all of it, reading the chunks where the rings hold them:

    scores  = q . summary of each held slot (fp32; -inf where the slot may not be picked)
    picks   = top_k slots by score, ties to the lowest chunk id (``topk_lowest_id``'s order)
    y       = softmax attention over [picked exact chunks (C keys) | picked pool chunks (C / r keys) |
              the previous chunk (if any) | the chunk in progress up to the token], one softmax, fp32

Same picks and formulas as the PyTorch step (the test oracle, tests/test_retrieval_decode.py); another
summation order, so scores within rounding of each other may pick differently (near-ties).
"""

from typing import Tuple

import torch

from hydralm.kernels.triton_common import tl, triton

# Slots (pool + bank) a program scores at once; more take the PyTorch step (a memory-less bank that grew large).
MAX_SLOTS = 4096

if triton is not None:

    @triton.jit
    def _chunk_update(q, keys, values, first, r, rows_ok, m_i, l_i, acc, scale_log2, d, dmask, D):
        """Online-softmax update of (m_i, l_i, acc) with rows first + r of keys / values, (rows, D) row-major
        (rows_ok: which rows count)."""
        k_ptrs = keys + (first + r)[:, None] * D + d[None, :]
        v_ptrs = values + (first + r)[:, None] * D + d[None, :]
        k = tl.load(k_ptrs, mask=rows_ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1) * scale_log2
        s = tl.where(rows_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing read yet: keep exp2 finite
        p = tl.exp2(s - m_safe)
        alpha = tl.exp2(m_i - m_safe)
        v = tl.load(v_ptrs, mask=rows_ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        return m_new, l_i * alpha + tl.sum(p, 0), acc

    @triton.jit
    def _retrieval_step_kernel(
        q_ptr, buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries, slot_ids, routable,
        pos_ptr, out_ptr,
        H, H_KV, S, P, D, scale_log2,
        C: tl.constexpr, CP: tl.constexpr, TOP_K: tl.constexpr,
        BLOCK_S: tl.constexpr, BC: tl.constexpr, BCP: tl.constexpr, BD: tl.constexpr, DB: tl.constexpr,
    ):  # fmt: skip
        row, h = tl.program_id(0), tl.program_id(1)
        hk = h // (H // H_KV)
        d = tl.arange(0, BD)
        dmask = d < D
        q = tl.load(q_ptr + (row * H + h) * D + d, mask=dmask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr)
        c, filled = pos // C, pos % C
        kv = (row * H_KV + hk).to(tl.int64)  # (row, key head): the rings' leading index; int64 offsets

        # Routing: q . summary over [pool | bank] slots, fp32, DB columns at a time (a whole (slots, D) tile would
        # not fit in registers).
        s_idx = tl.arange(0, BLOCK_S)
        in_pool, in_bank = s_idx < P, (s_idx >= P) & (s_idx < P + S)
        scores = tl.zeros([BLOCK_S], dtype=tl.float32)
        for d0 in tl.static_range(0, BD, DB):
            dd = d0 + tl.arange(0, DB)
            q_part = tl.load(q_ptr + (row * H + h) * D + dd, mask=dd < D, other=0.0).to(tl.float32)
            ptrs = tl.where(
                in_pool[:, None],
                pool_summaries + (kv * P + s_idx)[:, None] * D + dd[None, :],
                summaries + (kv * S + (s_idx - P))[:, None] * D + dd[None, :],
            )
            held = tl.load(ptrs, mask=(in_pool | in_bank)[:, None] & (dd < D)[None, :], other=0.0)
            scores += tl.sum(held * q_part[None, :], 1)
        ok = tl.load(routable + s_idx, mask=s_idx < P + S, other=0) != 0
        scores = tl.where(ok, scores, float("-inf"))
        n_ok = tl.sum(ok.to(tl.int32), 0)  # picks past the routable slots read nothing
        ids = tl.load(slot_ids + s_idx, mask=s_idx < P + S, other=0)
        big_id = tl.full([BLOCK_S], 2**62, dtype=tl.int64)

        m_i = tl.full([1], float("-inf"), dtype=tl.float32).sum(0)  # a scalar -inf
        l_i = tl.zeros([1], dtype=tl.float32).sum(0)
        acc = tl.zeros([BD], dtype=tl.float32)
        r_c, r_p = tl.arange(0, BC), tl.arange(0, BCP)
        for j in tl.static_range(TOP_K):
            best = tl.max(scores, 0)
            tied = scores == best
            chosen_id = tl.min(tl.where(tied, ids, big_id), 0)  # ties to the lowest chunk id
            slot = tl.min(tl.where(tied & (ids == chosen_id), s_idx, BLOCK_S), 0)
            scores = tl.where(s_idx == slot, float("-inf"), scores)
            # scalars broadcast to blocks before they meet a block (Triton's CPU interpreter mistypes the mix)
            base = (kv * S + (slot - P)) * C
            rows = (r_c < C) & (r_c * 0 + slot >= P) & (r_c * 0 + n_ok > j)
            m_i, l_i, acc = _chunk_update(q, bank_k, bank_v, base, r_c, rows, m_i, l_i, acc, scale_log2, d, dmask, D)
            base = (kv * P + slot) * CP
            rows = (r_p < CP) & (r_p * 0 + slot < P) & (r_p * 0 + n_ok > j)
            m_i, l_i, acc = _chunk_update(q, pool_k, pool_v, base, r_p, rows, m_i, l_i, acc, scale_log2, d, dmask, D)

        # Local context: the previous chunk (bank slot (c - 1) % S, none before the first) and the chunk in
        # progress up to this token.
        previous = (c + S - 1) % S
        rows = (r_c < C) & (r_c * 0 + c > 0)
        m_i, l_i, acc = _chunk_update(
            q, bank_k, bank_v, (kv * S + previous) * C, r_c, rows, m_i, l_i, acc, scale_log2, d, dmask, D
        )
        rows = (r_c < C) & (r_c * 0 + filled >= r_c)
        m_i, l_i, acc = _chunk_update(q, buf_k, buf_v, kv * C, r_c, rows, m_i, l_i, acc, scale_log2, d, dmask, D)
        tl.store(out_ptr + (row * H + h) * D + d, acc / l_i, mask=dmask)


@torch.library.custom_op("hydralm::retrieval_decode_step", mutates_args=())
def retrieval_decode_step(
    q: torch.Tensor,
    buf_k: torch.Tensor,
    buf_v: torch.Tensor,
    bank_k: torch.Tensor,
    bank_v: torch.Tensor,
    summaries: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    pool_summaries: torch.Tensor,
    slot_ids: torch.Tensor,
    routable: torch.Tensor,
    pos: torch.Tensor,
    top_k: int,
) -> Tuple[torch.Tensor]:
    """q (B, H, D) the token's queries; buf_k / buf_v (B, H_kv, C, D) the chunk in progress with the token written;
    bank_k / bank_v (B, H_kv, S, C, D) and summaries (B, H_kv, S, D) fp32 the exact ring; pool_k / pool_v (B, H_kv,
    P, C / r, D) and pool_summaries (B, H_kv, P, D) the compressed ring (P may be 0); slot_ids / routable (P + S,)
    the chunk id each slot holds and whether the token may pick it, pool slots first; pos a 0-d int64 tensor, the
    token's stream position. Returns (y,), y (B, H, D) in q's dtype. A custom op: the StaticDecoder's graphs keep
    it as one opaque call. A tuple, because inductor moves a single-output op to just before its first user, which
    comes after the layer's ring update: that update then needs a copy of each ring instead of writing in place."""
    B, H, D = q.shape
    h_kv, S, C = bank_k.shape[1], bank_k.shape[2], bank_k.shape[3]
    P, CP = pool_k.shape[2], pool_k.shape[3]
    out = torch.empty_like(q)
    args = [t.contiguous() for t in (q, buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries)]
    _retrieval_step_kernel[(B, H)](
        *args, slot_ids.contiguous(), routable.to(torch.int8).contiguous(), pos.reshape(1).to(torch.int64), out,
        H, h_kv, S, P, D, D**-0.5 * 1.4426950408889634,
        C=C, CP=max(CP, 1), TOP_K=min(top_k, P + S),
        BLOCK_S=triton.next_power_of_2(P + S), BC=triton.next_power_of_2(C), BCP=triton.next_power_of_2(max(CP, 1)),
        BD=triton.next_power_of_2(D), DB=min(8, triton.next_power_of_2(D)),
        num_warps=8,  # ptxas for sm_90 (576 slots, D 64, top-8): 184 registers, no spills; 4 warps spilled
    )  # fmt: skip
    return (out,)


@retrieval_decode_step.register_fake
def _(q, buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries, slot_ids, routable, pos, top_k):
    return (torch.empty_like(q),)
