"""One decode step of retrieval attention as three Triton kernels (backend HYDRALM_RETRIEVAL_DECODE=triton).

The PyTorch step (``RetrievalAttention.step``) scores the token's query against the summaries of the held chunks
(two fp32 matmuls, pool and bank), picks the top k with a sort-based top-k, gathers the picked chunks' keys and
values into new tensors and runs SDPA over them and the local context: about twenty kernels per layer and token,
and at batch 64 the gathered copies and SDPA are most of the decode step's GPU time (docs/benchmarks.md). Here,
reading the chunks where the rings hold them:

    _route_scores   one program per (row, query head, block of slots): scores = q . summary of each held slot
                    (fp32; -inf where the slot may not be picked)
    _attend_part    one program per (row, query head, part), parts = the k picks, the previous chunk, the chunk
                    in progress: the part's pick (top k slots by score, ties to the lowest chunk id, as
                    ``topk_lowest_id`` orders them), then an online softmax over its keys -> a partial output
                    and its base-2 log-sum-exp, fp32
    _combine_parts  one program per (row, query head): the k + 2 partials merged by their log-sum-exps, which is
                    one softmax over [picked exact chunks (C keys) | picked pool chunks (C / r keys) | the previous
                    chunk (if any) | the chunk in progress up to the token]

Flash-decoding's split: the work of a (row, head) spreads over many programs, so at batch 1 (12 heads) the GPU is
not left with twelve programs working through 576 slots and k chunks in sequence, as a one-kernel version did
(39 us a layer on an H200, slower than the PyTorch step's 24 us; docs/inference.md). Same picks and formulas as
the PyTorch step (the test oracle, tests/test_retrieval_decode.py); another summation order, so scores within
rounding of each other may pick differently (near-ties).
The part's softmax and the merge are shared with the sliding-window step (kernels/attention/
triton_decode_parts.py).
"""

from typing import Tuple

import torch

from hydralm.kernels.attention.triton_decode_parts import LOG2_E, combine_parts, empty_parts
from hydralm.kernels.triton_common import tl, triton

# Slots (pool + bank) a pick program reads the scores of at once; more take the PyTorch step (a memory-less bank
# that grew large).
MAX_SLOTS = 4096
ROUTE_BLOCK = 64  # slots per scoring program

if triton is not None:
    from hydralm.kernels.attention.triton_decode_parts import _chunk_softmax

    @triton.jit
    def _route_scores_kernel(
        q_ptr, summaries, pool_summaries, routable, scores_ptr, H, H_KV, S, P, D,
        BLOCK: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        """scores[row, h, slot] = q . summary (fp32) over a block of [pool | bank] slots; -inf where not routable."""
        bh, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)
        row, h = bh // H, bh % H
        kv = row * H_KV + h // (H // H_KV)
        d = tl.arange(0, BD)
        q = tl.load(q_ptr + bh * D + d, mask=d < D, other=0.0).to(tl.float32)
        s_idx = blk * BLOCK + tl.arange(0, BLOCK)
        in_pool, in_bank = s_idx < P, (s_idx >= P) & (s_idx < P + S)
        ptrs = tl.where(
            in_pool[:, None],
            pool_summaries + (kv * P + s_idx)[:, None] * D + d[None, :],
            summaries + (kv * S + (s_idx - P))[:, None] * D + d[None, :],
        )
        held = tl.load(ptrs, mask=(in_pool | in_bank)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        scores = tl.sum(held * q[None, :], 1)
        ok = tl.load(routable + s_idx, mask=s_idx < P + S, other=0) != 0
        tl.store(scores_ptr + bh * (P + S) + s_idx, tl.where(ok, scores, float("-inf")), mask=s_idx < P + S)

    @triton.jit
    def _attend_part_kernel(
        q_ptr, buf_k, buf_v, bank_k, bank_v, pool_k, pool_v, scores_ptr, slot_ids, pos_ptr,
        m_ptr, denom_ptr, acc_ptr,
        H, H_KV, S, P, D, scale_log2,
        C: tl.constexpr, CP: tl.constexpr, TOP_K: tl.constexpr,
        BLOCK_S: tl.constexpr, BC: tl.constexpr, BCP: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        """Part j < TOP_K: the j-th pick's chunk (exact or pooled); part TOP_K: the previous chunk; part TOP_K + 1:
        the chunk in progress up to the token. Writes the part's (max, exp-sum, unnormalised output)."""
        bh, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
        row, h = bh // H, bh % H
        kv = row * H_KV + h // (H // H_KV)  # (row, key head): the rings' leading index
        d = tl.arange(0, BD)
        dmask = d < D
        q = tl.load(q_ptr + bh * D + d, mask=dmask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr)
        c, filled = pos // C, pos % C
        r_c, r_p = tl.arange(0, BC), tl.arange(0, BCP)
        if part < TOP_K:
            s_idx = tl.arange(0, BLOCK_S)
            scores = tl.load(scores_ptr + bh * (P + S) + s_idx, mask=s_idx < P + S, other=float("-inf"))
            ids = tl.load(slot_ids + s_idx, mask=s_idx < P + S, other=0)
            big_id = tl.full([BLOCK_S], 2**62, dtype=tl.int64)
            # the part's pick: `part` picks are taken out first (scalar tensors, so the branches below agree on
            # their types when compiled)
            slot = tl.full([1], BLOCK_S, dtype=tl.int32).sum(0)
            found = tl.zeros([1], dtype=tl.int32).sum(0)  # 0: fewer routable slots than picks, nothing to read
            for j in tl.static_range(TOP_K):
                if j <= part:
                    best = tl.max(scores, 0)
                    tied = scores == best
                    chosen_id = tl.min(tl.where(tied, ids, big_id), 0)  # ties to the lowest chunk id
                    slot = tl.min(tl.where(tied & (ids == chosen_id), s_idx, BLOCK_S), 0)
                    found = (best > float("-inf")).to(tl.int32)
                    scores = tl.where(s_idx == slot, float("-inf"), scores)
            # scalars broadcast to blocks before they meet a block (Triton's CPU interpreter mistypes the mix)
            if slot >= P:
                exact_rows = (r_c < C) & (r_c * 0 + found > 0)
                m, denom, acc = _chunk_softmax(
                    q, bank_k, bank_v, (kv * S + (slot - P)) * C, r_c, exact_rows, scale_log2, d, dmask, D
                )
            else:
                pool_rows = (r_p < CP) & (r_p * 0 + found > 0)
                m, denom, acc = _chunk_softmax(
                    q, pool_k, pool_v, (kv * P + slot) * CP, r_p, pool_rows, scale_log2, d, dmask, D
                )
        elif part == TOP_K:  # the previous chunk: bank slot (c - 1) % S, none before the first chunk
            previous_rows = (r_c < C) & (r_c * 0 + c > 0)
            first = (kv * S + (c + S - 1) % S) * C
            m, denom, acc = _chunk_softmax(q, bank_k, bank_v, first, r_c, previous_rows, scale_log2, d, dmask, D)
        else:  # the chunk in progress, up to this token
            own_rows = (r_c < C) & (r_c * 0 + filled >= r_c)
            m, denom, acc = _chunk_softmax(q, buf_k, buf_v, kv * C, r_c, own_rows, scale_log2, d, dmask, D)
        out = bh * (TOP_K + 2) + part
        tl.store(m_ptr + out, m)
        tl.store(denom_ptr + out, denom)
        tl.store(acc_ptr + out * D + d, acc, mask=dmask)


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
    top_k = min(top_k, P + S)
    q, buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries = (
        t.contiguous() for t in (q, buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries)
    )
    slot_ids, BD = slot_ids.contiguous(), triton.next_power_of_2(D)
    scores = torch.empty(B * H, P + S, device=q.device, dtype=torch.float32)
    _route_scores_kernel[(B * H, triton.cdiv(P + S, ROUTE_BLOCK))](
        q, summaries, pool_summaries, routable.to(torch.int8).contiguous(), scores, H, h_kv, S, P, D,
        BLOCK=ROUTE_BLOCK, BD=BD,
    )  # fmt: skip
    parts = top_k + 2  # the picks, the previous chunk, the chunk in progress
    m, denom, acc = empty_parts(B * H, parts, D, q.device)
    _attend_part_kernel[(B * H, parts)](
        q, buf_k, buf_v, bank_k, bank_v, pool_k, pool_v, scores, slot_ids, pos.reshape(1).to(torch.int64),
        m, denom, acc, H, h_kv, S, P, D, D**-0.5 * LOG2_E,
        C=C, CP=max(CP, 1), TOP_K=top_k, BLOCK_S=triton.next_power_of_2(P + S), BC=triton.next_power_of_2(C),
        BCP=triton.next_power_of_2(max(CP, 1)), BD=BD,
    )  # fmt: skip
    return (combine_parts(m, denom, acc, torch.empty_like(q)),)


@retrieval_decode_step.register_fake
def _(q, buf_k, buf_v, bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries, slot_ids, routable, pos, top_k):
    return (torch.empty_like(q),)
