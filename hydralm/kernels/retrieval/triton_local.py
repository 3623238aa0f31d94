"""Triton kernels for the local part of retrieval attention, and the merge with the retrieved chunks.

Token t of chunk i reads chunk i-1 in full and chunk i up to itself: a banded causal mask, computed like flash
attention over the few key blocks of a query tile (2C + tile keys at most). The forward ends by folding in
the token's top_k retrieved-chunk results (each a normalised partial output and its log-sum-exp, written by
triton_sparse.py) as if each were one more key block of the online softmax, and writes the final output and
log-sum-exp. The backward is flash attention's: dK/dV owned by a program per key block (which loops over the
query heads of its group, so GQA needs no atomics), dQ by a program per query block, which also adds the
token's per-slot dQ contributions from the retrieved chunks in a fixed order. Nothing is accumulated with
atomics: the gradients are deterministic.

Log-sum-exps are kept in base 2 (scores are scaled by D^-0.5 * log2(e) and exponentiated with exp2).
"""

from hydralm.kernels.triton_common import interpreting, tl, triton

LOG2E = 1.4426950408889634


def autotune_configs(blocks: list, interpreter_blocks: dict) -> list:
    """Autotuning candidates: each block shape with 4 and 8 warps, picked once per (chunk size, head dim, dtype)
    on the GPU at hand (the best one depends on D and on register pressure: at D = 64, 64 x 64 tiles spill with
    4 warps in the backward kernels but not with 8). The CPU interpreter, which only checks the arithmetic, gets
    one config: small tiles so that small test inputs span several of them."""
    if interpreting():
        return [triton.Config(interpreter_blocks, num_warps=4, num_stages=1)]
    return [triton.Config(blocks_, num_warps=warps, num_stages=2) for blocks_ in blocks for warps in (4, 8)]


if triton is not None:

    @triton.autotune(
        configs=autotune_configs(
            [{"BM": 64, "BN": 64}, {"BM": 64, "BN": 32}, {"BM": 128, "BN": 64}], {"BM": 32, "BN": 32}
        ),
        key=["C", "D", "TOP_K"],
    )
    @triton.jit
    def _local_fwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        lse_part_ptr,
        o_part_ptr,
        out_ptr,
        lse_ptr,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        H,
        N,
        scale_log2,
        GROUP: tl.constexpr,
        C: tl.constexpr,
        D: tl.constexpr,
        TOP_K: tl.constexpr,
        HAS_SPARSE: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BD: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        hk = h // GROUP
        m0 = pid_m * BM
        rm, rd = m0 + tl.arange(0, BM), tl.arange(0, BD)
        m_ok, d_ok = rm < N, rd < D
        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + rm[:, None] * stride_qn + rd[None, :],
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        lo, hi = tl.maximum(m0 // C - 1, 0) * C, tl.minimum(m0 + BM, N)  # chunk (first chunk - 1) .. last row
        for n0 in range(lo, hi, BN):
            rn = n0 + tl.arange(0, BN)
            kv_mask = (rn < N)[:, None] & d_ok[None, :]
            k = tl.load(k_base + rn[:, None] * stride_kn + rd[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + rn[:, None] * stride_vn + rd[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            # local context: the previous chunk in full, the own chunk up to the query (rows past N are dropped)
            local = (rn[None, :] <= rm[:, None]) & (rn[None, :] >= (rm // C - 1)[:, None] * C)
            s = tl.where(local, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if HAS_SPARSE:
            # each retrieved chunk's normalised output o_s with log-sum-exp lse_s weighs like a key block whose
            # exp-sum is 2^lse_s; slots without a selection hold lse_s = -inf and weigh 0
            row = bh * N + rm
            for slot in range(TOP_K):
                e = row * TOP_K + slot
                lse_s = tl.load(lse_part_ptr + e, mask=m_ok, other=float("-inf"))
                ok = m_ok & (lse_s > float("-inf"))
                o_s = tl.load(o_part_ptr + e[:, None] * D + rd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
                o_s = o_s.to(tl.float32)
                m_new = tl.maximum(m_i, lse_s)
                alpha = tl.exp2(m_i - m_new)
                w = tl.exp2(lse_s - m_new)
                l_i = l_i * alpha + w
                acc = acc * alpha[:, None] + o_s * w[:, None]
                m_i = m_new
        out = acc / l_i[:, None]
        row_off = bh * N + rm
        tl.store(
            out_ptr + row_off[:, None] * D + rd[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )
        tl.store(lse_ptr + row_off, m_i + tl.log2(l_i), mask=m_ok)

    @triton.autotune(
        configs=autotune_configs(
            [{"BM": 32, "BN": 64}, {"BM": 64, "BN": 64}, {"BM": 32, "BN": 32}], {"BM": 32, "BN": 32}
        ),
        key=["C", "D", "GROUP"],
    )
    @triton.jit
    def _local_bwd_dkdv_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        do_ptr,
        lse_ptr,
        delta_ptr,
        dk_sparse_ptr,
        dv_sparse_ptr,
        dk_ptr,
        dv_ptr,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        H_KV,
        N,
        sparse_rows,
        scale_log2,
        scale,
        GROUP: tl.constexpr,
        C: tl.constexpr,
        D: tl.constexpr,
        HAS_SPARSE: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BD: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """A key block's dK/dV from the queries that read it locally (its own chunk from the key on, and the
        next chunk), over every query head of its group; plus the retrieved part (sparse_rows: the rows of
        completed chunks, which triton_sparse.py wrote)."""
        pid_n, bhk = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, hk = bhk // H_KV, bhk % H_KV
        n0 = pid_n * BN
        rn, rd = n0 + tl.arange(0, BN), tl.arange(0, BD)
        n_ok, d_ok = rn < N, rd < D
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + b * stride_kb + hk * stride_kh + rn[:, None] * stride_kn + rd[None, :], mask=kv_mask, other=0.0
        )
        v = tl.load(
            v_ptr + b * stride_vb + hk * stride_vh + rn[:, None] * stride_vn + rd[None, :], mask=kv_mask, other=0.0
        )
        dk = tl.zeros([BN, BD], dtype=tl.float32)
        dv = tl.zeros([BN, BD], dtype=tl.float32)
        last = tl.minimum(n0 + BN, N) - 1
        q_hi = tl.minimum(N, (last // C + 2) * C)
        for g in range(GROUP):
            h = hk * GROUP + g
            q_base = q_ptr + b * stride_qb + h * stride_qh
            row0 = (b * H_KV * GROUP + h) * N
            for m0 in range(n0, q_hi, BM):
                rm = m0 + tl.arange(0, BM)
                m_ok = rm < q_hi
                qd_mask = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + rm[:, None] * stride_qn + rd[None, :], mask=qd_mask, other=0.0)
                do = tl.load(do_ptr + (row0 + rm)[:, None] * D + rd[None, :], mask=qd_mask, other=0.0)
                lse = tl.load(lse_ptr + row0 + rm, mask=m_ok, other=0.0)
                delta = tl.load(delta_ptr + row0 + rm, mask=m_ok, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                keep = (rn[None, :] <= rm[:, None]) & (rn[None, :] >= (rm // C - 1)[:, None] * C) & m_ok[:, None]
                p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dk = dk * scale
        row_off = bhk * N + rn
        if HAS_SPARSE:
            sparse_mask = (rn < sparse_rows)[:, None] & d_ok[None, :]
            dk += tl.load(dk_sparse_ptr + row_off[:, None] * D + rd[None, :], mask=sparse_mask, other=0.0)
            dv += tl.load(dv_sparse_ptr + row_off[:, None] * D + rd[None, :], mask=sparse_mask, other=0.0)
        out_off = row_off[:, None] * D + rd[None, :]
        tl.store(dk_ptr + out_off, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    @triton.autotune(
        configs=autotune_configs(
            [{"BM": 32, "BN": 64}, {"BM": 64, "BN": 64}, {"BM": 64, "BN": 32}], {"BM": 32, "BN": 32}
        ),
        key=["C", "D", "TOP_K"],
    )
    @triton.jit
    def _local_bwd_dq_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        do_ptr,
        lse_ptr,
        delta_ptr,
        lse_part_ptr,
        dq_part_ptr,
        dq_ptr,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        H,
        N,
        scale_log2,
        scale,
        GROUP: tl.constexpr,
        C: tl.constexpr,
        D: tl.constexpr,
        TOP_K: tl.constexpr,
        HAS_SPARSE: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BD: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """A query block's dQ over its local keys, plus its slots' dQ from the retrieved chunks."""
        pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        hk = h // GROUP
        m0 = pid_m * BM
        rm, rd = m0 + tl.arange(0, BM), tl.arange(0, BD)
        m_ok, d_ok = rm < N, rd < D
        qd_mask = m_ok[:, None] & d_ok[None, :]
        row = bh * N + rm
        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + rm[:, None] * stride_qn + rd[None, :], mask=qd_mask, other=0.0
        )
        do = tl.load(do_ptr + row[:, None] * D + rd[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        dq = tl.zeros([BM, BD], dtype=tl.float32)
        lo, hi = tl.maximum(m0 // C - 1, 0) * C, tl.minimum(m0 + BM, N)  # chunk (first chunk - 1) .. last row
        for n0 in range(lo, hi, BN):
            rn = n0 + tl.arange(0, BN)
            kv_mask = (rn < N)[:, None] & d_ok[None, :]
            k = tl.load(k_base + rn[:, None] * stride_kn + rd[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + rn[:, None] * stride_vn + rd[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            keep = (rn[None, :] <= rm[:, None]) & (rn[None, :] >= (rm // C - 1)[:, None] * C) & m_ok[:, None]
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * scale
        if HAS_SPARSE:
            for slot in range(TOP_K):  # a fixed order: deterministic sums
                e = row * TOP_K + slot
                lse_s = tl.load(lse_part_ptr + e, mask=m_ok, other=float("-inf"))
                ok = m_ok & (lse_s > float("-inf"))
                dq_s = tl.load(dq_part_ptr + e[:, None] * D + rd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
                dq += dq_s.to(tl.float32)
        tl.store(dq_ptr + row[:, None] * D + rd[None, :], dq.to(dq_ptr.dtype.element_ty), mask=qd_mask)
