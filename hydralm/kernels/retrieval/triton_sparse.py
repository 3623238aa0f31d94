"""Retrieval attention from scratch as Triton kernels, forward and backward: `retrieval_attention_triton`.

Same semantics as the other paths of kernels/retrieval/ (the oracle is reference.py): token t of chunk i reads,
in one softmax, chunk i-1 in full, chunk i up to itself and its top_k chunks among 0 .. i-2 by q_t . summary.

How the work is laid out (cost O(N * (k + 2) * C * D) per head, whatever the routing):
1. routing (`route_sequence`: a Triton kernel with a running top-k on CUDA, triton_routing.py): selected
   (B, H, N, k) chunk ids, -1 where there are fewer candidates;
2. the selections inverted on the device into one list per (batch row, key head, chunk) of the query slots
   that chose it (selection_csr.py), cut into tiles of up to BM entries;
3. retrieved part, kv-centric: a program per tile reads its chunk's keys and values (in blocks of BN keys)
   against the tile's queries (from any token and any query head of the group) and writes each (query,
   slot)'s normalised partial output and log-sum-exp;
4. local part (triton_local.py): a flash-attention pass over chunk i-1 and chunk i per query tile, whose
   online softmax then takes in the token's k partial results, writing the output and the log-sum-exp.
Backward, with P recomputed from the saved log-sum-exp: the retrieved part's dK/dV by a program per (list,
key block) that loops over the list (it owns those rows: no atomics; a list longer than 2048 slots is split
into segments whose results a second pass adds up in order) and, where one program holds a whole chunk (C <=
64), its dQ per (query, slot) in the same loop (else by the tile programs in a second pass);
the local part as in flash attention, adding the retrieved dK/dV and the per-slot dQ in a fixed order. No
float atomics anywhere, so gradients are bit-for-bit reproducible, and each batch row is computed from its
own lists and tiles only, so a row's result does not depend on the other rows.

The kernels run under TRITON_INTERPRET=1 on CPU tensors (how the tests check them) and compile for CUDA.
"""

from typing import List, Optional, Tuple

import torch

from hydralm.kernels.retrieval.routing import route_sequence
from hydralm.kernels.retrieval.selection_csr import ListSegments, selection_csr, tile_work_list
from hydralm.kernels.retrieval.triton_local import (
    LOG2E,
    _local_bwd_dkdv_kernel,
    _local_bwd_dq_kernel,
    _local_fwd_kernel,
    autotune_configs,
)
from hydralm.kernels.triton_common import dot_precision, interpreting, tl, triton, triton_available

MAX_HEAD_DIM = 128

if triton is not None:

    @triton.autotune(configs=autotune_configs([{"BN": 64}, {"BN": 32}], {"BN": 16}), key=["C", "D", "TOP_K"])
    @triton.jit
    def _sparse_fwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        entries_ptr,
        tile_list_ptr,
        tile_start_ptr,
        offsets_ptr,
        o_part_ptr,
        lse_part_ptr,
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
        H_KV,
        N,
        N_CHUNKS,
        scale_log2,
        C: tl.constexpr,
        D: tl.constexpr,
        TOP_K: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BD: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One tile of a chunk's list: softmax of its queries over the chunk's C keys -> normalised partial
        outputs and base-2 log-sum-exps, stored at each query slot's entry index."""
        slot = tl.program_id(0)
        lst = tl.load(tile_list_ptr + slot).to(tl.int64)
        if lst < 0:  # past the last tile
            return
        chunk, bhk = lst % N_CHUNKS, lst // N_CHUNKS
        b, hk = bhk // H_KV, bhk % H_KV
        rm = tl.load(tile_start_ptr + slot) + tl.arange(0, BM)
        m_ok = rm < tl.load(offsets_ptr + lst + 1)
        e = tl.load(entries_ptr + rm, mask=m_ok, other=0).to(tl.int64)  # (query row, slot) entries
        row = e // TOP_K
        h, t = (row // N) % H, row % N
        rd = tl.arange(0, BD)
        d_ok = rd < D
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q_off = b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qn + rd[None, :]
        q = tl.load(q_ptr + q_off, mask=qd_mask, other=0.0)
        k_base = k_ptr + b * stride_kb + hk * stride_kh + chunk * C * stride_kn
        v_base = v_ptr + b * stride_vb + hk * stride_vh + chunk * C * stride_vn
        m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        for n0 in range(0, C, BN):  # the chunk in key blocks (every block holds a key: no row is all -inf)
            rc = n0 + tl.arange(0, BN)
            c_ok = rc < C
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + rc[:, None] * stride_kn + rd[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + rc[:, None] * stride_vn + rd[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            s = tl.where(c_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(o_part_ptr + e[:, None] * D + rd[None, :], o.to(o_part_ptr.dtype.element_ty), mask=qd_mask)
        tl.store(lse_part_ptr + e, m_i + tl.log2(l_i), mask=m_ok)

    @triton.autotune(configs=autotune_configs([{"BN": 64}, {"BN": 32}], {"BN": 16}), key=["C", "D", "TOP_K"])
    @triton.jit
    def _sparse_bwd_dq_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        do_ptr,
        lse_ptr,
        delta_ptr,
        entries_ptr,
        tile_list_ptr,
        tile_start_ptr,
        offsets_ptr,
        dq_part_ptr,
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
        H_KV,
        N,
        N_CHUNKS,
        scale_log2,
        scale,
        C: tl.constexpr,
        D: tl.constexpr,
        TOP_K: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BD: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One tile of a chunk's list: each query slot's dQ from that chunk (P from the saved log-sum-exp)."""
        slot = tl.program_id(0)
        lst = tl.load(tile_list_ptr + slot).to(tl.int64)
        if lst < 0:  # past the last tile
            return
        chunk, bhk = lst % N_CHUNKS, lst // N_CHUNKS
        b, hk = bhk // H_KV, bhk % H_KV
        rm = tl.load(tile_start_ptr + slot) + tl.arange(0, BM)
        m_ok = rm < tl.load(offsets_ptr + lst + 1)
        e = tl.load(entries_ptr + rm, mask=m_ok, other=0).to(tl.int64)  # (query row, slot) entries
        row = e // TOP_K
        h, t = (row // N) % H, row % N
        rd = tl.arange(0, BD)
        d_ok = rd < D
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q_off = b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qn + rd[None, :]
        q = tl.load(q_ptr + q_off, mask=qd_mask, other=0.0)
        do = tl.load(do_ptr + row[:, None] * D + rd[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
        k_base = k_ptr + b * stride_kb + hk * stride_kh + chunk * C * stride_kn
        v_base = v_ptr + b * stride_vb + hk * stride_vh + chunk * C * stride_vn
        dq = tl.zeros([BM, BD], dtype=tl.float32)
        for n0 in range(0, C, BN):
            rc = n0 + tl.arange(0, BN)
            c_ok = rc < C
            kv_mask = c_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + rc[:, None] * stride_kn + rd[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + rc[:, None] * stride_vn + rd[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            p = tl.where(m_ok[:, None] & c_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * scale
        tl.store(dq_part_ptr + e[:, None] * D + rd[None, :], dq.to(dq_part_ptr.dtype.element_ty), mask=qd_mask)

    @triton.jit
    def _sparse_bwd_kv_centric(
        q_ptr,
        k_ptr,
        v_ptr,
        do_ptr,
        lse_ptr,
        delta_ptr,
        entries_ptr,
        offsets_ptr,
        slot_list_ptr,
        slot_start_ptr,
        slot_buffer_ptr,
        dk_ptr,
        dv_ptr,
        dk_buffer_ptr,
        dv_buffer_ptr,
        dq_part_ptr,
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
        H_KV,
        N,
        N_CHUNKS,
        scale_log2,
        scale,
        C: tl.constexpr,
        D: tl.constexpr,
        TOP_K: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BD: tl.constexpr,
        SEGMENT: tl.constexpr,
        FUSE_DQ: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """dK/dV of BN rows of one chunk from one segment of its list (query slots of any query head of the
        group), in the list's order. A one-segment list's program owns those rows and writes them; a longer
        list's segments write row blocks of a buffer that `_sparse_dkdv_sum_kernel` adds up. No atomics.
        FUSE_DQ (BN covers the whole chunk): also each query slot's dQ from the chunk, which is then complete in
        this program, so no second pass reloads the slots' queries and output gradients to compute it."""
        slot, pid_n = tl.program_id(0), tl.program_id(1)
        lst = tl.load(slot_list_ptr + slot).to(tl.int64)
        if lst < 0:  # past the last segment
            return
        chunk, bhk = lst % N_CHUNKS, lst // N_CHUNKS
        b, hk = bhk // H_KV, bhk % H_KV
        rc, rd = pid_n * BN + tl.arange(0, BN), tl.arange(0, BD)
        c_ok, d_ok = rc < C, rd < D
        key_rows = chunk * C + rc
        kv_mask = c_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + b * stride_kb + hk * stride_kh + key_rows[:, None] * stride_kn + rd[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_ptr + b * stride_vb + hk * stride_vh + key_rows[:, None] * stride_vn + rd[None, :],
            mask=kv_mask,
            other=0.0,
        )
        dk = tl.zeros([BN, BD], dtype=tl.float32)
        dv = tl.zeros([BN, BD], dtype=tl.float32)
        lo = tl.load(slot_start_ptr + slot)
        hi = tl.minimum(lo + SEGMENT, tl.load(offsets_ptr + lst + 1))
        for start in range(lo, hi, BM):
            rm = start + tl.arange(0, BM)
            m_ok = rm < hi
            e = tl.load(entries_ptr + rm, mask=m_ok, other=0).to(tl.int64)
            row = e // TOP_K
            h, t = (row // N) % H, row % N
            qd_mask = m_ok[:, None] & d_ok[None, :]
            q_off = b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qn + rd[None, :]
            q = tl.load(q_ptr + q_off, mask=qd_mask, other=0.0)
            do = tl.load(do_ptr + row[:, None] * D + rd[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
            delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            p = tl.where(m_ok[:, None] & c_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
            if FUSE_DQ:
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
                tl.store(dq_part_ptr + e[:, None] * D + rd[None, :], dq.to(dq_part_ptr.dtype.element_ty), mask=qd_mask)
        buffer = tl.load(slot_buffer_ptr + slot).to(tl.int64)
        if buffer < 0:
            out_off = (bhk * N + key_rows)[:, None] * D + rd[None, :]
            tl.store(dk_ptr + out_off, dk * scale, mask=kv_mask)
            tl.store(dv_ptr + out_off, dv, mask=kv_mask)
        else:
            out_off = (buffer * C + rc)[:, None] * D + rd[None, :]
            tl.store(dk_buffer_ptr + out_off, dk * scale, mask=kv_mask)
            tl.store(dv_buffer_ptr + out_off, dv, mask=kv_mask)

    # the kv-centric backward in two tilings: key blocks of any BN (then dQ is `_sparse_bwd_dq_kernel`'s), or the
    # whole chunk in one block, BN passed by the caller, with dQ fused
    _sparse_bwd_dkdv_kernel = triton.autotune(
        configs=autotune_configs(
            [{"BM": 32, "BN": 64}, {"BM": 64, "BN": 64}, {"BM": 32, "BN": 32}], {"BM": 16, "BN": 16}
        ),
        key=["C", "D", "TOP_K"],
    )(_sparse_bwd_kv_centric)
    _sparse_bwd_dkdv_dq_kernel = triton.autotune(
        configs=autotune_configs([{"BM": 16}, {"BM": 32}, {"BM": 64}], {"BM": 16}), key=["C", "D", "TOP_K"]
    )(_sparse_bwd_kv_centric)

    @triton.jit
    def _sparse_dkdv_sum_kernel(
        list_segments_ptr,
        list_first_buffer_ptr,
        dk_buffer_ptr,
        dv_buffer_ptr,
        dk_ptr,
        dv_ptr,
        N,
        N_CHUNKS,
        C: tl.constexpr,
        D: tl.constexpr,
        BN: tl.constexpr,
        BD: tl.constexpr,
    ):
        """A long list's dK/dV: its segments' row blocks summed in segment order into the chunk's rows; zeros for
        a chunk nobody chose."""
        lst, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
        n_segments = tl.load(list_segments_ptr + lst)
        if n_segments == 1:  # written directly
            return
        first = tl.load(list_first_buffer_ptr + lst).to(tl.int64)
        rc, rd = pid_n * BN + tl.arange(0, BN), tl.arange(0, BD)
        mask = (rc < C)[:, None] & (rd < D)[None, :]
        dk = tl.zeros([BN, BD], dtype=tl.float32)
        dv = tl.zeros([BN, BD], dtype=tl.float32)
        for segment in range(n_segments):
            off = ((first + segment) * C + rc)[:, None] * D + rd[None, :]
            dk += tl.load(dk_buffer_ptr + off, mask=mask, other=0.0)
            dv += tl.load(dv_buffer_ptr + off, mask=mask, other=0.0)
        chunk, bhk = lst % N_CHUNKS, lst // N_CHUNKS
        out_off = (bhk * N + chunk * C + rc)[:, None] * D + rd[None, :]
        tl.store(dk_ptr + out_off, dk, mask=mask)
        tl.store(dv_ptr + out_off, dv, mask=mask)

    @triton.jit
    def _row_dot_kernel(a_ptr, b_ptr, out_ptr, n_rows, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
        """rowsum(a * b) in fp32 of BR contiguous rows of D: one read of each (PyTorch's form made fp32 copies)."""
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        rd = tl.arange(0, BD)
        mask = (rows < n_rows)[:, None] & (rd < D)[None, :]
        off = rows[:, None] * D + rd[None, :]
        a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, tl.sum(a * b, 1), mask=rows < n_rows)


def _query_tile(D: int, dtype: torch.dtype) -> int:
    """Query slots per tile of the retrieved part (the lists are cut on the host side of the launch, so this one
    is not autotuned): 64, or 32 for fp32 at D > 64, whose tiles would crowd shared memory; 16 in the CPU
    interpreter, so small test inputs span several tiles per list."""
    if interpreting():
        return 16
    return 32 if dtype == torch.float32 and D > 64 else 64


def _list_segment() -> int:
    """Query slots per dK/dV program of the retrieved part: a list longer than this (a chunk that very many
    tokens chose) is split, its parts summed in a fixed order. 32 in the CPU interpreter, so tests split."""
    return 32 if interpreting() else 2048


def _partial_dtype(q: torch.Tensor) -> torch.dtype:
    """The per-(query, slot) partial outputs and dQs, written once and read once: in the inputs' 16-bit dtype
    (the output's own precision; half the memory traffic of fp32, which at 64k tokens, H 12, top-8 is 1.6 GB
    each way per tensor), fp32 for fp32 inputs. The merges that read them add in fp32."""
    return q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32


def _whole_chunk_block(C: int) -> int:
    """The key block of a backward program that holds a whole chunk (so it computes the slots' dQ too), or 0
    where a chunk is too long for one block's registers (C > 64: then dQ is a second pass)."""
    block = max(16, triton.next_power_of_2(C))
    return block if block <= 64 else 0


def _strides(*tensors: torch.Tensor) -> list:
    return [s for t in tensors for s in t.stride()[:3]]


class _RetrievalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, selected, chunk_size):
        C, top_k = chunk_size, selected.shape[-1]
        n_chunks = q.shape[2] // C
        has_sparse = q.shape[2] > 2 * C  # some token of chunk >= 2 has a chunk to pick
        sources = [(selected, k, v, C)] if has_sparse else []
        out, lse, lse_part, lists = _forward(q, k, v, C, top_k, sources)
        ctx.save_for_backward(q, k, v, out, lse, lse_part, *(lists[0].tensors() if has_sparse else ()))
        ctx.meta = (C, top_k, n_chunks, has_sparse, _query_tile(q.shape[-1], q.dtype))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse, lse_part, *lists = ctx.saved_tensors
        C, top_k, n_chunks, has_sparse, tile = ctx.meta
        B, H, N, D = q.shape
        h_kv = k.shape[1]
        shape = dict(C=C, D=D, BD=max(16, triton.next_power_of_2(D)), PRECISION=dot_precision(q.dtype))
        scales = (D**-0.5 * LOG2E, D**-0.5)
        do = d_out.to(q.dtype).contiguous()
        delta = torch.empty(B, H, N, device=q.device)  # rowsum(dO * O): the softmax backward's correction term
        _row_dot_kernel[(triton.cdiv(B * H * N, 64),)](do, out, delta, B * H * N, D=D, BR=64, BD=shape["BD"])
        dk_sparse = dv_sparse = dq_part = lse_part  # placeholders when nothing is retrieved
        if has_sparse:
            entries, offsets, tile_list, tile_start = lists
            # dK/dV of the retrieved part, on the rows of completed chunks (the rest is never read); the sum
            # kernel writes the rows of chunks nobody chose as zeros
            segment = _list_segment()
            segments = ListSegments(offsets, entries.numel(), segment)
            dk_sparse = torch.empty(B, h_kv, N, D, device=q.device)
            dv_sparse = torch.empty_like(dk_sparse)
            dk_buffer = torch.empty(segments.buffer_blocks * C, D, device=q.device)
            dv_buffer = torch.empty_like(dk_buffer)
            dq_part = torch.empty(lse_part.numel(), D, device=q.device, dtype=_partial_dtype(q))  # per (query, slot)
            kv_args = (
                q, k, v, do, lse, delta, entries, offsets, segments.slot_list, segments.slot_start,
                segments.slot_buffer, dk_sparse, dv_sparse, dk_buffer, dv_buffer, dq_part, *_strides(q, k, v),
                H, h_kv, N, n_chunks, *scales,
            )  # fmt: skip
            whole_chunk = _whole_chunk_block(C)
            if whole_chunk:  # one program per list segment holds the chunk: dQ fused
                _sparse_bwd_dkdv_dq_kernel[(segments.slot_list.numel(), 1)](
                    *kv_args, TOP_K=top_k, SEGMENT=segment, BN=whole_chunk, FUSE_DQ=True, **shape
                )
            else:  # key blocks of a chunk in programs of their own, then dQ per tile of a list
                _sparse_bwd_dkdv_kernel[lambda meta: (segments.slot_list.numel(), triton.cdiv(C, meta["BN"]))](
                    *kv_args, TOP_K=top_k, SEGMENT=segment, FUSE_DQ=False, **shape
                )
                _sparse_bwd_dq_kernel[(tile_list.numel(),)](
                    q, k, v, do, lse, delta, entries, tile_list, tile_start, offsets, dq_part, *_strides(q, k, v),
                    H, h_kv, N, n_chunks, *scales, TOP_K=top_k, BM=tile, **shape,
                )  # fmt: skip
            _sparse_dkdv_sum_kernel[(B * h_kv * n_chunks, triton.cdiv(C, 32))](
                segments.list_segments, segments.list_first_buffer, dk_buffer, dv_buffer, dk_sparse, dv_sparse,
                N, n_chunks, C=C, D=D, BN=32, BD=shape["BD"],
            )  # fmt: skip
        dk = torch.empty(B, h_kv, N, D, device=k.device, dtype=k.dtype)
        dv = torch.empty(B, h_kv, N, D, device=v.device, dtype=v.dtype)
        _local_bwd_dkdv_kernel[lambda meta: (triton.cdiv(N, meta["BN"]), B * h_kv)](
            q, k, v, do, lse, delta, dk_sparse, dv_sparse, dk, dv, *_strides(q, k, v), h_kv, N, n_chunks * C,
            *scales, GROUP=H // h_kv, HAS_SPARSE=has_sparse, **shape,
        )  # fmt: skip
        dq = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
        _local_bwd_dq_kernel[lambda meta: (triton.cdiv(N, meta["BM"]), B * H)](
            q, k, v, do, lse, delta, lse_part, dq_part, dq, *_strides(q, k, v), H, N, *scales,
            GROUP=H // h_kv, TOP_K=top_k, HAS_SPARSE=has_sparse, **shape,
        )  # fmt: skip
        return dq, dk, dv, None, None


class _SparseLists:
    """The selections as per-chunk lists of query slots and the lists' tiles (selection_csr.py)."""

    def __init__(self, selected: torch.Tensor, n_kv_heads: int, n_chunks: int, tile: int):
        self.entries, self.offsets = selection_csr(selected, n_kv_heads, n_chunks)
        self.tile_list, self.tile_start = tile_work_list(self.offsets, self.entries.numel(), tile)

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return self.entries, self.offsets, self.tile_list, self.tile_start


# Opaque to torch.compile, as the delta rule op is: a compiled block launches these kernels as they are (traced,
# inductor passes the float scale into the forward kernel as fp64 and its online softmax fails to compile). The
# same holds for the forward with a state below, which a stream through compiled blocks reaches.
@torch.compiler.disable
def retrieval_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    top_k: int,
    route_block: int = 4096,
    selected: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Token-routed chunk-sparse attention from scratch (no state): token t of chunk i reads chunk i-1, chunk i
    up to t, and its top_k chunks among 0 .. i-2 by q_t . mean(keys of the chunk), in one softmax.

    q (B, H, N, D), k/v (B, H_kv, N, D) with H_kv dividing H, fp32/fp16/bf16, any N (the last chunk may be
    partial), D <= 128, any chunk_size; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Returns
    (B, H, N, D) in q's dtype; differentiable in q, k, v (routing is not: it picks, it does not weigh).
    route_block: queries routed at a time off CUDA (`route_sequence`; bounds the score tensor to (B, H,
    route_block, N / C)).
    selected: a routing computed beforehand, (B, H, N, top_k) chunk ids as `route_tokens_blocked` returns them
    (-1 = none; ids must be < t // C - 1, which is not checked), e.g. to compare paths on one routing."""
    _check_inputs(q, k, v, chunk_size, top_k, selected)
    N, C = q.shape[2], chunk_size
    if N == 0:
        return q.clone()
    if selected is None:
        selected = route_sequence(q, k, C, top_k, route_block)
    selected = selected.to(torch.int32).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if interpreting() and q.dtype != torch.float32:  # the CPU interpreter multiplies 16-bit operands wrongly
        return _RetrievalAttention.apply(q.float(), k.float(), v.float(), selected, C).to(q.dtype)
    return _RetrievalAttention.apply(q, k, v, selected, C)


@torch.compiler.disable
@torch.no_grad()
def retrieval_forward_from_sources(
    q: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    chunk_size: int,
    sources: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]],
) -> torch.Tensor:
    """Retrieval attention given the routing and where the picked chunks live: the forward of a call with a state
    (chunked prefill, streaming, compressed reads), with the kernels of the parallel path. No autograd.

    q (B, H, N, D) and k_local / v_local (B, H_kv, N, D) lie on the chunk grid (row 0 starts a chunk): row t
    reads chunk t // C - 1 in full and its own chunk up to itself, as from scratch, plus the chunks its
    selections name. sources: (selected (B, H, N, top_k) ids into this source, -1 = none; keys, values
    (B, H_kv, n * L, D); L keys per chunk) per source, e.g. exact chunks (L = C) and compressed ones (L = C / r);
    a (row, slot) names a chunk in at most one source. One softmax over all of it per row."""
    top_k = sources[0][0].shape[-1]
    if interpreting() and q.dtype != torch.float32:  # the CPU interpreter multiplies 16-bit operands wrongly
        up = [(sel, keys.float(), values.float(), length) for sel, keys, values, length in sources]
        return retrieval_forward_from_sources(q.float(), k_local.float(), v_local.float(), chunk_size, up).to(q.dtype)
    q, k_local, v_local = (t.contiguous() for t in (q, k_local, v_local))
    sources = [
        (sel, keys.to(q.dtype).contiguous(), values.to(q.dtype).contiguous(), n) for sel, keys, values, n in sources
    ]
    return _forward(q, k_local, v_local, chunk_size, top_k, [s for s in sources if s[1].shape[2] >= s[3]])[0]


def _forward(q, k_local, v_local, chunk_size: int, top_k: int, sources: list) -> tuple:
    """The retrieved part, one launch per source (selected, keys, values, keys per chunk), into per-(query, slot)
    partial outputs and log-sum-exps, then the local part merging them. Returns (out, lse, lse_part, the
    sources' lists)."""
    B, H, N, D = q.shape
    h_kv = k_local.shape[1]
    shape = dict(D=D, BD=max(16, triton.next_power_of_2(D)), PRECISION=dot_precision(q.dtype))
    scale_log2 = D**-0.5 * LOG2E
    tile = _query_tile(D, q.dtype)
    n_slots = B * H * N * top_k if sources else 1
    # per (query, slot): the retrieved chunk's normalised output and log-sum-exp (-inf: no selection)
    lse_part = torch.full((n_slots,), float("-inf"), device=q.device)
    o_part = torch.empty(n_slots, D, device=q.device, dtype=_partial_dtype(q))
    all_lists = []
    for selected, keys, values, length in sources:
        n_chunks = keys.shape[2] // length
        lists = _SparseLists(selected.to(torch.int32).contiguous(), h_kv, n_chunks, tile)
        all_lists.append(lists)
        _sparse_fwd_kernel[(lists.tile_list.numel(),)](
            q, keys, values, lists.entries, lists.tile_list, lists.tile_start, lists.offsets, o_part, lse_part,
            *_strides(q, keys, values), H, h_kv, N, n_chunks, scale_log2, C=length, TOP_K=top_k, BM=tile, **shape,
        )  # fmt: skip
    out = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _local_fwd_kernel[lambda meta: (triton.cdiv(N, meta["BM"]), B * H)](
        q, k_local, v_local, lse_part, o_part, out, lse, *_strides(q, k_local, v_local), H, N, scale_log2,
        GROUP=H // h_kv, C=chunk_size, TOP_K=top_k, HAS_SPARSE=bool(sources), **shape,
    )  # fmt: skip
    return out, lse, lse_part, all_lists


def _check_inputs(q, k, v, chunk_size: int, top_k: int, selected: Optional[torch.Tensor]) -> None:
    def fail(message: str) -> None:
        raise ValueError(f"retrieval_attention_triton: {message}")

    if not triton_available():
        fail("needs the `triton` package")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        fail(
            f"q must be (B, H, N, D) and k, v (B, H_kv, N, D) alike; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D or H % k.shape[1] != 0:
        fail(f"k/v {tuple(k.shape)} must be (B={B}, H_kv, N={N}, D={D}) with H_kv dividing H={H}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        fail(f"q, k, v must share one of float32, float16, bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= D <= MAX_HEAD_DIM:
        fail(f"head dim D={D} must be in 1 .. {MAX_HEAD_DIM}")
    if chunk_size < 1:
        fail(f"chunk_size={chunk_size} must be >= 1")
    if top_k < 1:
        fail(f"top_k={top_k} must be >= 1")
    if B * H * N * top_k >= 2**31:
        fail(f"B * H * N * top_k = {B * H * N * top_k} query slots; at most 2^31 - 1 (int32 lists)")
    if not (q.is_cuda or (q.device.type == "cpu" and interpreting())):
        fail(f"tensors on {q.device}: CUDA, or CPU under TRITON_INTERPRET=1")
    if not (q.device == k.device == v.device):
        fail(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if selected is not None and (selected.shape != (B, H, N, top_k) or selected.is_floating_point()):
        fail(
            f"selected must be integer chunk ids of shape {(B, H, N, top_k)}; got {selected.dtype} "
            f"{tuple(selected.shape)}"
        )
