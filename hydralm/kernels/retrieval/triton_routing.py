"""The routing of retrieval attention as one Triton kernel: `route_tokens_triton` (a sequence from scratch) and
`route_ranges_triton` (a call with a state: per chunk of the call, a range of held summaries).

Same selections as `route_tokens_blocked` (routing.py): token t of chunk i = t // C picks its top_k chunks
among 0 .. i-2 by q_t . summary_j in fp32, ties to the lowest chunk id, ordered by score then id. A program
scores a tile of queries against the summaries of its key head block by block and keeps a running top-k in
registers, so no score tensor reaches memory: routing reads q and the summaries once per query tile and
writes (B, H, N, top_k) ids. In PyTorch the same takes a score tensor, a masked fill, a top-k and the
tie-breaking passes over it, several times the memory traffic.

A score and its chunk id are packed into one int64 whose order is (score, -id): the score's fp32 bits
mapped to an order-preserving int32 in the high word, 2^31 - 1 - id in the low word. The largest keys are an
exact top-k with the lowest id first among equal scores. The running top-k is a threshold filter, not a sort:
summaries are scanned in ascending id, so a block's candidates are the scores (as order-preserving int32)
strictly above the k-th best key's score; a block costs one int32 compare and one reduction unless it beats
some query's k-th best, and then one max-extraction per newcomer (at most k), where tl.topk ran a sorting
network over every block.

Scores are computed with tl.dot: TF32 when torch's fp32 matmul precision allows it (as route_tokens does), else
"tf32x3" (three TF32 products on the tensor cores, within about 1e-6 of fp32) rather than IEEE fp32, which
Triton runs on the FMA units: on an H200 the router took 9.5 ms with IEEE dots and 4.2 ms with tf32x3 at 64k
tokens, H 12, C 64, top-8 (2026-12-01, ff8dedd), and 5 in a million picks differed between the two (near-ties).
So scores may differ from the PyTorch router's in the last bits, and a near-tie may then resolve differently;
exact scores (as in the tests, where queries and keys are small integers) give identical selections.
"""

import torch

from hydralm.kernels.triton_common import dot_precision, tl, triton

if triton is not None:

    @triton.jit
    def _route_kernel(
        q_ptr,
        summaries_ptr,
        selected_ptr,
        first_ptr,
        end_ptr,
        stride_qb,
        stride_qh,
        stride_qn,
        H,
        H_KV,
        N,
        N_CHUNKS,
        C: tl.constexpr,
        D: tl.constexpr,
        TOP_K: tl.constexpr,
        KP: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BD: tl.constexpr,
        PRECISION: tl.constexpr,
        RANGED: tl.constexpr,
    ):
        pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        hk = h // (H // H_KV)
        m0 = pid_m * BM
        rm, rd = m0 + tl.arange(0, BM), tl.arange(0, BD)
        m_ok, d_ok = rm < N, rd < D
        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + rm[:, None] * stride_qn + rd[None, :],
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if RANGED:  # the token's chunk of the call gives its eligible summaries: first .. end - 1
            first = tl.load(first_ptr + rm // C, mask=m_ok, other=N_CHUNKS)
            n_eligible = tl.load(end_ptr + rm // C, mask=m_ok, other=0)
            col0 = tl.min(first, 0) // BN * BN
            n_cols = tl.minimum(tl.max(n_eligible, 0), N_CHUNKS)
        else:  # from scratch: a token of chunk i may pick chunks 0 .. i - 2
            first = tl.zeros([BM], dtype=tl.int32)
            n_eligible = rm // C - 1
            col0 = 0
            n_cols = (tl.minimum(m0 + BM, N) - 1) // C - 1  # the most any token of the tile may pick
        # best: each query's top KP keys so far, unordered; empty slots hold distinct sentinels below every real
        # key, so "the smallest slot" (thr) is always one slot. Summaries are scanned in ascending id, so a block's
        # key ties with a held key only to lose it (a larger id): the block's candidates are its scores strictly
        # above thr's score word, an int32 compare, and no int64 key is formed for the block. At most KP rounds
        # move the largest remaining candidate of every row (lowest id among equal scores) into its smallest
        # slot; a block with no candidate (most blocks, once the best are filled) costs one compare and one
        # reduction.
        NONE: tl.constexpr = -(2**63)
        LOWEST: tl.constexpr = -(2**31)  # below every ordered score but a negative NaN's
        best = NONE + 1 + tl.broadcast_to(tl.arange(0, KP)[None, :], [BM, KP]).to(tl.int64)
        thr = tl.min(best, 1)
        thr_score = (thr >> 32).to(tl.int32)  # LOWEST while a sentinel is held
        s_base = summaries_ptr + (b * H_KV + hk) * N_CHUNKS * D
        for n0 in range(col0, n_cols, BN):
            rn = n0 + tl.arange(0, BN)
            s = tl.load(s_base + rn[:, None] * D + rd[None, :], mask=(rn < n_cols)[:, None] & d_ok[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(s), input_precision=PRECISION) + 0.0  # + 0.0: -0.0 becomes +0.0
            bits = scores.to(tl.int32, bitcast=True)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 order = float order
            eligible = (rn[None, :] < n_eligible[:, None]) & (rn[None, :] >= first[:, None])
            cand = eligible & (ordered > thr_score[:, None])
            while tl.max(cand.to(tl.int32)) > 0:
                top_score, top_col = tl.max(
                    tl.where(cand, ordered, LOWEST), 1, return_indices=True, return_indices_tie_break_left=True
                )
                top = (top_score.to(tl.int64) << 32) | (0x7FFFFFFF - (n0 + top_col)).to(tl.int64)
                best = tl.where((top_score > LOWEST)[:, None] & (best == thr[:, None]), top[:, None], best)
                thr = tl.min(best, 1)
                thr_score = (thr >> 32).to(tl.int32)
                cand = cand & (ordered > thr_score[:, None]) & (tl.arange(0, BN)[None, :] != top_col[:, None])
        best = tl.sort(best, 1, descending=True)  # by score, then lowest id; the sentinels last
        ids = tl.where(best <= NONE + KP, -1, 0x7FFFFFFF - (best & 0xFFFFFFFF)).to(tl.int32)
        rk = tl.arange(0, KP)
        tl.store(
            selected_ptr + (bh * N + rm)[:, None] * TOP_K + rk[None, :],
            ids,
            mask=m_ok[:, None] & (rk < TOP_K)[None, :],
        )


def route_tokens_triton(q: torch.Tensor, summaries: torch.Tensor, chunk_size: int, top_k: int) -> torch.Tensor:
    """`route_tokens_blocked` as one Triton kernel: q (B, H, N, D), summaries (B, H_kv, >= N // C, D) fp32 ->
    chunk ids (B, H, N, top_k) int32, -1 where fewer than top_k chunks are eligible."""
    return _route(q, summaries, chunk_size, top_k, None)


def route_ranges_triton(
    q: torch.Tensor, summaries: torch.Tensor, chunk_size: int, top_k: int, first: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """`route_tokens` for a call with a state, as one kernel: token t of q (B, H, N, D), laid on the call's chunk
    grid, picks among summaries[first[t // C] : end[t // C]] (summaries (B, H_kv, n, D): pool, bank and the call's
    completed chunks in stream order; first / end (N / C,) int). Returns indices into summaries (B, H, N, top_k)
    int32, -1 where fewer than top_k are eligible."""
    return _route(q, summaries, chunk_size, top_k, (first, end))


def _route(q, summaries, chunk_size: int, top_k: int, ranges) -> torch.Tensor:
    B, H, N, D = q.shape
    summaries = summaries.float().contiguous()
    selected = torch.empty(B, H, N, top_k, dtype=torch.int32, device=q.device)
    if N == 0:
        return selected
    if ranges is None:
        first = end = selected  # not read
    else:
        # clamped into [0, n]: the kernel reads summaries from the smallest `first` of a tile on
        first, end = (r.clamp(0, summaries.shape[2]).to(device=q.device, dtype=torch.int32) for r in ranges)
        first, end = first.contiguous(), end.contiguous()
    KP = triton.next_power_of_2(top_k)
    # 16 queries x 16 summaries a block on one warp: a block costs one round over it per newcomer of its busiest
    # row, so small blocks waste fewer rounds on rows without one, and one warp reduces without shared memory.
    # On an H200 (H 12, D 64, C 64, top-8; 2026-12-02, 1529765) with TF32 scores 2.13 ms at 64k tokens and 0.85 ms
    # at 16k x 4, against 2.14 / 0.86 for 32 x 16 on 2 warps, 2.28 / 0.90 for 64 x 16 on 4 and 3.25 / 1.33 for
    # 32 x 32 on 2; with tf32x3 scores 2.77 / 1.02 against 3.31 / 1.22 for 32 x 16 on 2. The int64-key filter
    # this replaced took 2.35 / 0.95 (TF32) and 3.25 / 1.21 (tf32x3) at 32 x 16 on 2 warps; loading the next
    # block's summaries while scoring this one made each shape slower.
    BM, BN, warps = 16, max(16, KP), 1
    _route_kernel[(triton.cdiv(N, BM), B * H)](
        q, summaries, selected, first, end, *q.stride()[:3], H, summaries.shape[1], N, summaries.shape[2],
        C=chunk_size, D=D, TOP_K=top_k, KP=KP, BM=BM, BN=BN, BD=max(16, triton.next_power_of_2(D)),
        PRECISION=_score_precision(), RANGED=ranges is not None, num_warps=warps,
    )  # fmt: skip
    return selected


def _score_precision() -> str:
    """tl.dot's precision for the scores: IEEE fp32 becomes tf32x3 (module docstring); TF32 stays TF32."""
    return "tf32x3" if dot_precision() == "ieee" else "tf32"
