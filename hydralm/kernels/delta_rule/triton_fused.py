"""The whole chunkwise gated delta rule in Triton kernels, forward and backward (HYDRALM_DELTANET=fused).

Same algorithm and notation as ``delta_rule_chunkwise`` (chunk.py). With the Triton pass over
chunks alone, the layer still spent ~80 % of its time in the batched PyTorch around it: two triangular solves
forward and two backward (6.4 of 25 ms at B8 T4096 H16 K128 on an H200) and ~60 elementwise fp32 passes over
(B, H, T, d) tensors. Here each chunk's work is one Triton program that keeps its tiles in registers:

    prep   (per chunk)  gamma = cumsum(g); A = tril_-1((beta k) k^T * D); X = (I + A)^-1 by forward
                        substitution (at C 64 in 16 x 16 blocks, as fla does: HYDRALM_DELTANET_BLOCKED_INVERSE;
                        the diagonal blocks as products of powers of A);
                        U = X (beta v); W = X (beta Gamma k); Kd = k Gamma_C / Gamma; a = Gamma_C
    pass   (over chunks, triton_state_pass.state_pass_forward)   H_c, delta_c, final state
    output (per chunk)  o = (scale Gamma q) H_c + (scale q k^T * D, i >= j) delta_c

The backward runs the same three in reverse: the output kernel's adjoint (dq, and the gradients of H and
delta), the pass's reverse kernel, then the prep kernel's adjoint, which reuses the stored inverse X
(dA = -X^T dX X^T) and ends with the reverse cumulative sum that turns d(gamma) into dg.

q, k, v may be strided views (the layer passes (B, T, H, D) tensors transposed to (B, H, T, D)); only their
last dimension must be contiguous. Tiles are powers of two >= 16 with rows / columns past C, T, K, V masked.
"""

from typing import Optional

import torch

from hydralm.kernels.backend import deltanet_blocked_inverse, deltanet_dot16, deltanet_recompute
from hydralm.kernels.delta_rule.reference import l2_normalize
from hydralm.kernels.delta_rule.triton_state_pass import state_pass_backward, state_pass_forward
from hydralm.kernels.triton_common import SIXTEEN_BIT_DOTS, dot, dot_precision, interpreting, tile_sizes, tl, triton

# Columns of v / the state handled per step of the kernels' loops over d_v: with whole 128-wide tiles the
# backward kernels needed 263 KiB of shared memory on an H200 (limit 227 KiB).
BLOCK_V = 64
BLOCK_K = 64  # the same for d_k in the prep backward, which holds the most tiles


def _configs() -> list:
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


if triton is not None:

    @triton.jit
    def _program(T, H, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """This program's chunk c and (batch, head) bh = (b, h); the chunk's row indices in the tile, their token
        positions t and which rows are real tokens; the column ranges of a d_k and a d_v block."""
        c, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rc = tl.arange(0, BC)
        t = c * C + rc
        return c, bh, bh // H, bh % H, rc, t, (rc < C) & (t < T), tl.arange(0, BK), tl.arange(0, BV)

    @triton.jit
    def _load_rows(ptr, base, t, s_t, m_row, cols, n_cols):
        """A (BC, BD) tile of a strided (T, D) matrix (last dim contiguous) as fp32; padding reads 0."""
        mask = m_row[:, None] & (cols < n_cols)[None, :]
        return tl.load(ptr + base + t[:, None].to(tl.int64) * s_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _out_rows(ptr, b, h, bh, t, cols, s_b, s_h, s_t, T, N: tl.constexpr, STRIDED_OUT: tl.constexpr):
        """Addresses of rows t, columns cols of one (batch, head)'s (T, N) slice of an output: of a (B, H, T, N)
        view with strides s_b, s_h, s_t (last dim contiguous) when STRIDED_OUT, else of a contiguous tensor."""
        if STRIDED_OUT:
            return ptr + b * s_b + h * s_h + t[:, None].to(tl.int64) * s_t + cols[None, :]
        return ptr + bh * T * N + t[:, None].to(tl.int64) * N + cols[None, :]

    @triton.jit
    def _unit_rows(x, NORM_QK: tl.constexpr, EPS: tl.constexpr):
        """(x * r, r) with r = 1 / sqrt(sum_j x_j^2 + EPS) per row when NORM_QK (the layer's L2 norm of q and k,
        as fla's l2norm: the tile must hold whole rows), else (x, 1)."""
        if NORM_QK:
            r = 1.0 / tl.sqrt(tl.sum(x * x, 1) + EPS)
            return x * r[:, None], r
        return x, tl.full([x.shape[0]], 1.0, tl.float32)

    @triton.jit
    def _through_unit_rows(dxh, xh, r, NORM_QK: tl.constexpr):
        """The gradient of x from that of xh = x * r (as `_unit_rows`): r (dxh - xh (xh . dxh))."""
        if NORM_QK:
            return r[:, None] * (dxh - xh * tl.sum(xh * dxh, 1)[:, None])
        return dxh

    @triton.jit
    def _chunk_tile(ptr, chunk, rc, cols, C: tl.constexpr, N: tl.constexpr):
        """A (rows, block) tile of a contiguous per-chunk (C, N) fp32 buffer (the state: (K, V)); rows past C,
        columns past N read 0."""
        return tl.load(
            ptr + chunk * C * N + rc[:, None] * N + cols[None, :],
            mask=(rc < C)[:, None] & (cols < N)[None, :],
            other=0.0,
        )

    @triton.jit
    def _gates(g_ptr, beta_ptr, bh, t, m_row, T):
        """gamma = cumsum(g) inside the chunk and beta, both fp32 (padding: g = 0, beta = 0)."""
        g = tl.load(g_ptr + bh * T + t, mask=m_row, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + bh * T + t, mask=m_row, other=0.0).to(tl.float32)
        return tl.cumsum(g, 0), beta

    @triton.jit
    def _decay(gamma, rc, STRICT: tl.constexpr):
        """D[i, j] = Gamma_i / Gamma_j on i > j (STRICT) or i >= j, else 0 (exp of -inf: never inf * 0)."""
        if STRICT:
            keep = rc[:, None] > rc[None, :]
        else:
            keep = rc[:, None] >= rc[None, :]
        return tl.exp(tl.where(keep, gamma[:, None] - gamma[None, :], float("-inf")))

    @triton.jit
    def _unit_lower_inverse(A, rc, N: tl.constexpr):
        """(I + A)^-1 for a strictly lower triangular tile A that is 0 past row N: row i of X is
        e_i - sum_{j<i} A[i, j] X[j, :], rows in order (forward substitution, one row per step)."""
        X = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0)
        for i in range(1, N):
            a_i = tl.sum(tl.where(rc[:, None] == i, A, 0.0), 0)  # A[i, :] indexed by j
            X = tl.where(rc[:, None] == i, X - tl.sum(a_i[:, None] * X, 0)[None, :], X)
        return X

    @triton.jit
    def _block16(ptr, i: tl.constexpr, j: tl.constexpr, C: tl.constexpr):
        """The (i, j) 16 x 16 block of a C x C row-major matrix."""
        r = tl.arange(0, 16)
        return tl.load(ptr + (i * 16 + r)[:, None] * C + (j * 16 + r)[None, :])

    @triton.jit
    def _store_block16(ptr, i: tl.constexpr, j: tl.constexpr, C: tl.constexpr, X):
        r = tl.arange(0, 16)
        tl.store(ptr + (i * 16 + r)[:, None] * C + (j * 16 + r)[None, :], X)

    @triton.jit
    def _mm16(a, b):
        return tl.dot(a, b, input_precision="ieee")  # 16 x 16 x 16: cheap even on the FMA units

    @triton.jit
    def _unit_lower_inverse_16(A):
        """(I + A)^-1 for a strictly lower 16 x 16 A as a product: with N = -A nilpotent (N^16 = 0),
        (I - N)^-1 = I + N + N^2 + ... + N^15 = (I + N)(I + N^2)(I + N^4)(I + N^8). Six small dots in a row
        instead of 15 dependent substitution steps of two reductions each: the prep kernel at B4 T16384 H12 K64
        took 0.78 ms this way and 1.40 ms by substitution on an H200 (d183362)."""
        r = tl.arange(0, 16)
        N = -A
        X = tl.where(r[:, None] == r[None, :], 1.0, 0.0) + N
        N = _mm16(N, N)
        X += _mm16(X, N)
        N = _mm16(N, N)
        X += _mm16(X, N)
        N = _mm16(N, N)
        return X + _mm16(X, N)

    @triton.jit
    def _unit_lower_inverse_64(A, x_ptr, rc):
        """(I + A)^-1 for a strictly lower 64 x 64 A in blocks of 16 (as fla's solve_tril): the four diagonal
        blocks as products (`_unit_lower_inverse_16`), the rest by the block recurrence
        X_ij = -X_ii sum_{j <= m < i} A_im X_mj in IEEE dots. x_ptr (64 x 64 fp32, row-major) is the scratch
        through which the tile is cut into blocks and put back together; it ends holding X."""
        tl.store(x_ptr + rc[:, None] * 64 + rc[None, :], A)
        tl.debug_barrier()
        a10, a20, a21 = _block16(x_ptr, 1, 0, 64), _block16(x_ptr, 2, 0, 64), _block16(x_ptr, 2, 1, 64)
        a30, a31, a32 = _block16(x_ptr, 3, 0, 64), _block16(x_ptr, 3, 1, 64), _block16(x_ptr, 3, 2, 64)
        x00 = _unit_lower_inverse_16(_block16(x_ptr, 0, 0, 64))
        x11 = _unit_lower_inverse_16(_block16(x_ptr, 1, 1, 64))
        x22 = _unit_lower_inverse_16(_block16(x_ptr, 2, 2, 64))
        x33 = _unit_lower_inverse_16(_block16(x_ptr, 3, 3, 64))
        tl.debug_barrier()  # every block of A is read before X overwrites it
        x10 = -_mm16(x11, _mm16(a10, x00))
        x21 = -_mm16(x22, _mm16(a21, x11))
        x32 = -_mm16(x33, _mm16(a32, x22))
        x20 = -_mm16(x22, _mm16(a20, x00) + _mm16(a21, x10))
        x31 = -_mm16(x33, _mm16(a31, x11) + _mm16(a32, x21))
        x30 = -_mm16(x33, _mm16(a30, x00) + _mm16(a31, x10) + _mm16(a32, x20))
        # the blocks above the diagonal hold A's zeros already; the others become X's
        _store_block16(x_ptr, 0, 0, 64, x00)
        _store_block16(x_ptr, 1, 0, 64, x10)
        _store_block16(x_ptr, 1, 1, 64, x11)
        _store_block16(x_ptr, 2, 0, 64, x20)
        _store_block16(x_ptr, 2, 1, 64, x21)
        _store_block16(x_ptr, 2, 2, 64, x22)
        _store_block16(x_ptr, 3, 0, 64, x30)
        _store_block16(x_ptr, 3, 1, 64, x31)
        _store_block16(x_ptr, 3, 2, 64, x32)
        _store_block16(x_ptr, 3, 3, 64, x33)
        tl.debug_barrier()
        return tl.load(x_ptr + rc[:, None] * 64 + rc[None, :])

    @triton.autotune(configs=_configs(), key=["C", "K", "V"])
    @triton.jit
    def _prep_fwd_kernel(
        k_ptr,
        v_ptr,
        g_ptr,
        beta_ptr,
        u_ptr,
        w_ptr,
        kd_ptr,
        a_ptr,
        x_ptr,
        s_kb,
        s_kh,
        s_kt,
        s_vb,
        s_vh,
        s_vt,
        T,
        H,
        n_chunks,
        C: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
        NORM_QK: tl.constexpr,
        EPS: tl.constexpr,
        STRIDED_OUT: tl.constexpr,
        BLOCKED_INVERSE: tl.constexpr,
    ):
        c, bh, b, h, rc, t, m_row, rk, rv = _program(T, H, C, BC, BK, BV)
        k, _ = _unit_rows(_load_rows(k_ptr, b * s_kb + h * s_kh, t, s_kt, m_row, rk, K), NORM_QK, EPS)
        gamma, beta = _gates(g_ptr, beta_ptr, bh, t, m_row, T)
        kb = k * beta[:, None]
        A = dot(kb, tl.trans(k), PRECISION) * _decay(gamma, rc, True)
        chunk = bh * n_chunks + c
        if BLOCKED_INVERSE:  # C == BC == 64
            X = _unit_lower_inverse_64(A, x_ptr + chunk * C * C, rc)
        else:
            X = _unit_lower_inverse(A, rc, C)  # rows past C: A = 0, X = I
        for v0 in range(0, V, BV):  # U = X (beta v), one BV-wide column block at a time (shared memory)
            cols = v0 + rv
            v = _load_rows(v_ptr, b * s_vb + h * s_vh, t, s_vt, m_row, cols, V)
            tl.store(
                u_ptr + chunk * C * V + rc[:, None] * V + cols[None, :],
                dot(X, v * beta[:, None], PRECISION),
                mask=(rc < C)[:, None] & (cols < V)[None, :],
            )
        W = dot(X, kb * tl.exp(gamma)[:, None], PRECISION)
        gamma_last = tl.sum(tl.where(rc == C - 1, gamma, 0.0), 0)
        Kd = k * tl.exp(gamma_last - gamma)[:, None]
        ck = chunk * C * K + rc[:, None] * K + rk[None, :]
        m_ck = (rc < C)[:, None] & (rk < K)[None, :]
        tl.store(w_ptr + ck, W, mask=m_ck)
        tl.store(kd_ptr + ck, Kd, mask=m_ck)
        tl.store(a_ptr + chunk, tl.exp(gamma_last))
        if not BLOCKED_INVERSE:  # the blocked inverse leaves X in x_ptr already
            m_cc = (rc < C)[:, None] & (rc < C)[None, :]
            tl.store(x_ptr + chunk * C * C + rc[:, None] * C + rc[None, :], X, mask=m_cc)

    @triton.autotune(configs=_configs(), key=["C", "K", "V"])
    @triton.jit
    def _output_fwd_kernel(
        q_ptr,
        k_ptr,
        g_ptr,
        h_ptr,
        delta_ptr,
        o_ptr,
        scale,
        s_qb,
        s_qh,
        s_qt,
        s_kb,
        s_kh,
        s_kt,
        s_yb,
        s_yh,
        s_yt,
        T,
        H,
        n_chunks,
        C: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
        NORM_QK: tl.constexpr,
        EPS: tl.constexpr,
        STRIDED_OUT: tl.constexpr,
    ):
        """o (B, H, T, V) in v's dtype (the fp32 sums are rounded once, on the store); strided (s_y*) when
        STRIDED_OUT, else contiguous."""
        c, bh, b, h, rc, t, m_row, rk, rv = _program(T, H, C, BC, BK, BV)
        q, _ = _unit_rows(_load_rows(q_ptr, b * s_qb + h * s_qh, t, s_qt, m_row, rk, K), NORM_QK, EPS)
        k, _ = _unit_rows(_load_rows(k_ptr, b * s_kb + h * s_kh, t, s_kt, m_row, rk, K), NORM_QK, EPS)
        gamma = tl.cumsum(tl.load(g_ptr + bh * T + t, mask=m_row, other=0.0).to(tl.float32), 0)
        chunk = bh * n_chunks + c
        P = dot(q, tl.trans(k), PRECISION) * _decay(gamma, rc, False) * scale
        qd = q * (scale * tl.exp(gamma))[:, None]
        for v0 in range(0, V, BV):
            cols = v0 + rv
            S, delta = _chunk_tile(h_ptr, chunk, rk, cols, K, V), _chunk_tile(delta_ptr, chunk, rc, cols, C, V)
            o = dot(qd, S, PRECISION) + dot(P, delta, PRECISION)
            tl.store(
                _out_rows(o_ptr, b, h, bh, t, cols, s_yb, s_yh, s_yt, T, V, STRIDED_OUT),
                o,
                mask=m_row[:, None] & (cols < V)[None, :],
            )

    @triton.autotune(configs=_configs(), key=["C", "K", "V"])
    @triton.jit
    def _output_bwd_kernel(
        q_ptr,
        k_ptr,
        g_ptr,
        h_ptr,
        delta_ptr,
        do_ptr,
        gh_ptr,
        gdelta_ptr,
        dq_ptr,
        dk_ptr,
        dgamma_ptr,
        scale,
        s_qb,
        s_qh,
        s_qt,
        s_kb,
        s_kh,
        s_kt,
        s_ob,
        s_oh,
        s_ot,
        s_gqb,
        s_gqh,
        s_gqt,
        T,
        H,
        n_chunks,
        C: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
        NORM_QK: tl.constexpr,
        EPS: tl.constexpr,
        STRIDED_OUT: tl.constexpr,
    ):
        """The output kernel's adjoint: gradients of H_c and delta_c (for the pass), dq (final), and this
        kernel's shares of dk and d(gamma) (the prep adjoint adds its own; with NORM_QK, of the unit k)."""
        c, bh, b, h, rc, t, m_row, rk, rv = _program(T, H, C, BC, BK, BV)
        q, r_q = _unit_rows(_load_rows(q_ptr, b * s_qb + h * s_qh, t, s_qt, m_row, rk, K), NORM_QK, EPS)
        k, _ = _unit_rows(_load_rows(k_ptr, b * s_kb + h * s_kh, t, s_kt, m_row, rk, K), NORM_QK, EPS)
        gamma = tl.cumsum(tl.load(g_ptr + bh * T + t, mask=m_row, other=0.0).to(tl.float32), 0)
        chunk = bh * n_chunks + c
        qd = q * (scale * tl.exp(gamma))[:, None]
        D = _decay(gamma, rc, False) * scale
        P = dot(q, tl.trans(k), PRECISION) * D
        dqd = tl.zeros([BC, BK], dtype=tl.float32)
        dP = tl.zeros([BC, BC], dtype=tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + rv
            do = _load_rows(do_ptr, b * s_ob + h * s_oh, t, s_ot, m_row, cols, V)
            kv = chunk * K * V + rk[:, None] * V + cols[None, :]
            m_kv = (rk < K)[:, None] & (cols < V)[None, :]
            cv = chunk * C * V + rc[:, None] * V + cols[None, :]
            m_cv = (rc < C)[:, None] & (cols < V)[None, :]
            tl.store(gh_ptr + kv, dot(tl.trans(qd), do, PRECISION), mask=m_kv)
            tl.store(gdelta_ptr + cv, dot(tl.trans(P), do, PRECISION), mask=m_cv)
            S = tl.load(h_ptr + kv, mask=m_kv, other=0.0)
            dqd += dot(do, tl.trans(S), PRECISION)
            delta = tl.load(delta_ptr + cv, mask=m_cv, other=0.0)
            dP += dot(do, tl.trans(delta), PRECISION)
        dS = dP * D  # gradient of the raw scores q k^T
        dq = dqd * (scale * tl.exp(gamma))[:, None] + dot(dS, k, PRECISION)
        dk = dot(tl.trans(dS), q, PRECISION)
        G = dP * P  # d(log D[i, j]) = d(gamma_i) - d(gamma_j)
        dgamma = tl.sum(dqd * qd, 1) + tl.sum(G, 1) - tl.sum(G, 0)
        ck = bh * T * K + t[:, None].to(tl.int64) * K + rk[None, :]
        m_ck = m_row[:, None] & (rk < K)[None, :]
        dq_at = _out_rows(dq_ptr, b, h, bh, t, rk, s_gqb, s_gqh, s_gqt, T, K, STRIDED_OUT)
        tl.store(dq_at, _through_unit_rows(dq, q, r_q, NORM_QK), mask=m_ck)
        tl.store(dk_ptr + ck, dk, mask=m_ck)
        tl.store(dgamma_ptr + bh * T + t, dgamma, mask=m_row)

    @triton.autotune(configs=_configs(), key=["C", "K", "V"])
    @triton.jit
    def _prep_bwd_kernel(
        k_ptr,
        v_ptr,
        g_ptr,
        beta_ptr,
        x_ptr,
        du_ptr,
        dw_ptr,
        dkd_ptr,
        da_ptr,
        a_ptr,
        dk_out_ptr,
        dgamma_out_ptr,
        dk_ptr,
        dv_ptr,
        dg_ptr,
        dbeta_ptr,
        s_kb,
        s_kh,
        s_kt,
        s_vb,
        s_vh,
        s_vt,
        s_gkb,
        s_gkh,
        s_gkt,
        s_gvb,
        s_gvh,
        s_gvt,
        T,
        H,
        n_chunks,
        C: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
        NORM_QK: tl.constexpr,
        EPS: tl.constexpr,
        STRIDED_OUT: tl.constexpr,
    ):
        """The prep kernel's adjoint: adds its shares of dk and d(gamma) to the output kernel's (dk_out,
        dgamma_out; separate buffers, as the autotuner reruns kernels) and writes dk, dv, dg, dbeta.
        d_k is walked in BK-wide blocks twice (the (C, d_k) tiles of a whole head overflow shared memory):
        first for the sums over d_k (the scores (beta k) k^T and dX), then for the per-column gradients.
        NORM_QK (one block: BK >= K) takes the gradient of the unit k back to the raw k on the store."""
        c, bh, b, h, rc, t, m_row, rk, rv = _program(T, H, C, BC, BK, BV)
        gamma, beta = _gates(g_ptr, beta_ptr, bh, t, m_row, T)
        Gamma = tl.exp(gamma)
        chunk = bh * n_chunks + c
        X = _chunk_tile(x_ptr, chunk, rc, rc, C, C)

        scores = tl.zeros([BC, BC], dtype=tl.float32)  # (beta k) k^T
        dX = tl.zeros([BC, BC], dtype=tl.float32)  # U = X Bv, W = X Bk: dX = dU Bv^T + dW Bk^T
        for k0 in range(0, K, BK):
            cols = k0 + rk
            k, _ = _unit_rows(_load_rows(k_ptr, b * s_kb + h * s_kh, t, s_kt, m_row, cols, K), NORM_QK, EPS)
            kb = k * beta[:, None]
            dW = _chunk_tile(dw_ptr, chunk, rc, cols, C, K)
            scores += dot(kb, tl.trans(k), PRECISION)
            dX += dot(dW, tl.trans(kb * Gamma[:, None]), PRECISION)
        dbeta = tl.zeros([BC], dtype=tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + rv
            v = _load_rows(v_ptr, b * s_vb + h * s_vh, t, s_vt, m_row, cols, V)
            dU = _chunk_tile(du_ptr, chunk, rc, cols, C, V)
            dBv = dot(tl.trans(X), dU, PRECISION)
            tl.store(
                _out_rows(dv_ptr, b, h, bh, t, cols, s_gvb, s_gvh, s_gvt, T, V, STRIDED_OUT),
                dBv * beta[:, None],
                mask=m_row[:, None] & (cols < V)[None, :],
            )
            dbeta += tl.sum(dBv * v, 1)
            dX += dot(dU, tl.trans(v * beta[:, None]), PRECISION)

        dA = -dot(dot(tl.trans(X), dX, PRECISION), tl.trans(X), PRECISION)
        dA = tl.where(rc[:, None] > rc[None, :], dA, 0.0)
        M = dA * _decay(gamma, rc, True)  # A = scores * D
        G = M * scores  # dA * A: d(log D[i, j]) = d(gamma_i) - d(gamma_j)
        dgamma = tl.sum(G, 1) - tl.sum(G, 0)
        gamma_last = tl.sum(tl.where(rc == C - 1, gamma, 0.0), 0)
        to_end = tl.exp(gamma_last - gamma)
        kd_dot = tl.zeros([BC], dtype=tl.float32)  # sum over d_k of dKd * k
        for k0 in range(0, K, BK):
            cols = k0 + rk
            k, r_k = _unit_rows(_load_rows(k_ptr, b * s_kb + h * s_kh, t, s_kt, m_row, cols, K), NORM_QK, EPS)
            kb = k * beta[:, None]
            dW, dKd = _chunk_tile(dw_ptr, chunk, rc, cols, C, K), _chunk_tile(dkd_ptr, chunk, rc, cols, C, K)
            dBk = dot(tl.trans(X), dW, PRECISION)
            dgamma += tl.sum(dBk * kb, 1) * Gamma  # Bk = kb Gamma
            dkb = dBk * Gamma[:, None] + dot(M, k, PRECISION)
            dbeta += tl.sum(dkb * k, 1)
            kd_dot += tl.sum(dKd * k, 1)
            dk = dkb * beta[:, None] + dot(tl.trans(M), kb, PRECISION) + dKd * to_end[:, None]
            tk = bh * T * K + t[:, None].to(tl.int64) * K + cols[None, :]
            m_tk = m_row[:, None] & (cols < K)[None, :]
            dk += tl.load(dk_out_ptr + tk, mask=m_tk, other=0.0)
            dk_at = _out_rows(dk_ptr, b, h, bh, t, cols, s_gkb, s_gkh, s_gkt, T, K, STRIDED_OUT)
            tl.store(dk_at, _through_unit_rows(dk, k, r_k, NORM_QK), mask=m_tk)
        e = kd_dot * to_end  # Kd = k Gamma_C / Gamma
        da_a = tl.load(da_ptr + chunk) * tl.load(a_ptr + chunk)  # a = Gamma_C
        dgamma += tl.where(rc == C - 1, tl.sum(e, 0) + da_a, 0.0) - e
        dgamma += tl.load(dgamma_out_ptr + bh * T + t, mask=m_row, other=0.0)
        # gamma = cumsum(g): dg_t = sum_{s >= t} d(gamma_s)
        dg = tl.sum(dgamma, 0) - tl.cumsum(dgamma, 0) + dgamma
        tl.store(dg_ptr + bh * T + t, dg, mask=m_row)
        tl.store(dbeta_ptr + bh * T + t, dbeta, mask=m_row)


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def kernel_constants(
    C: int,
    K: int,
    V: int,
    qk_l2norm_eps: Optional[float] = None,
    strided_out: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """The kernels' compile-time constants for chunk size C and head dims K, V; with qk_l2norm_eps the kernels
    L2-normalise the rows of q and k they load (K must fit one BLOCK_K tile: `norm_fits_kernels`); strided_out:
    o, dq, dk, dv are written through their strides (views of head-last tensors) instead of contiguously; dtype:
    the inputs' (the fp32 dots' precision follows it: `dot_precision`, or 16-bit operands for 16-bit inputs with
    HYDRALM_DELTANET_DOT16=1)."""
    BC, BK = tile_sizes(C, K)
    BV = min(BLOCK_V, max(16, triton.next_power_of_2(V)))
    norm = dict(NORM_QK=qk_l2norm_eps is not None, EPS=float(qk_l2norm_eps or 0.0))
    sixteen_bit = deltanet_dot16() and dtype in SIXTEEN_BIT_DOTS
    precision = SIXTEEN_BIT_DOTS[dtype] if sixteen_bit else dot_precision(dtype)
    return dict(C=C, K=K, V=V, BC=BC, BK=BK, BV=BV, PRECISION=precision, STRIDED_OUT=strided_out, **norm)


def norm_fits_kernels(C: int, K: int) -> bool:
    """Whether every kernel holds a whole row of k in one tile (the prep adjoint walks d_k in BLOCK_K blocks)."""
    return tile_sizes(C, K)[1] <= BLOCK_K


def chunk_factors(k, v, g, beta, consts):
    """The prep kernel alone: the per-chunk WY factors (U, W, Kd, a, X), all fp32. k, v (B, H, T, d) with the
    last dim contiguous; g, beta (B, H, T) fp32 contiguous."""
    B, H, T, K = k.shape
    V, C = v.shape[-1], consts["C"]
    n = triton.cdiv(T, C)
    f32 = dict(device=k.device, dtype=torch.float32)
    U, W, Kd = (torch.empty(B, H, n, C, d, **f32) for d in (V, K, K))
    a, X = torch.empty(B, H, n, **f32), torch.empty(B, H, n, C, C, **f32)
    blocked = deltanet_blocked_inverse() and C == 64
    _prep_fwd_kernel[(n, B * H)](
        k, v, g, beta, U, W, Kd, a, X, *_strides(k), *_strides(v), T, H, n, **consts, BLOCKED_INVERSE=blocked
    )
    return U, W, Kd, a, X


def chunk_pass(k, v, g, beta, S0, consts):
    """The per-chunk WY factors and the pass over chunks: (X, W, Kd, a, states, delta, final), all fp32."""
    U, W, Kd, a, X = chunk_factors(k, v, g, beta, consts)
    states, delta, final = state_pass_forward(U, W, Kd, a, S0, consts["PRECISION"])
    return X, W, Kd, a, states, delta, final


def _empty_out(like: torch.Tensor, n_cols: int, dtype: torch.dtype, head_last: bool) -> torch.Tensor:
    """A (B, H, T, n_cols) output: a view of a (B, T, H, n_cols) tensor when head_last, else contiguous."""
    B, H, T = like.shape[:3]
    if head_last:
        return torch.empty(B, T, H, n_cols, device=like.device, dtype=dtype).transpose(1, 2)
    return torch.empty(B, H, T, n_cols, device=like.device, dtype=dtype)


def _forward(ctx, q, k, v, g, beta, S0, scale, C, qk_l2norm_eps, head_last):
    """The fused forward (both autograd Functions): o (B, H, T, V) (a view of a head-last tensor when
    head_last) and the final state; what backward needs goes on ctx."""
    ctx.set_materialize_grads(False)  # an unused output (often the final state) gets no zeros tensor
    B, H, T, K = k.shape
    V = v.shape[-1]
    n = triton.cdiv(T, C)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    g, beta = g.float().contiguous(), beta.float().contiguous()
    S0 = None if S0 is None else S0.float().contiguous()
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    consts = kernel_constants(C, K, V, qk_l2norm_eps, strided_out=head_last, dtype=dtype)
    X, W, Kd, a, states, delta, final = chunk_pass(k, v, g, beta, S0, consts)
    o = _empty_out(v, V, v.dtype, head_last)  # the kernels store in the tensors' dtypes
    _output_fwd_kernel[(n, B * H)](
        q, k, g, states, delta, o, scale, *_strides(q), *_strides(k), *_strides(o), T, H, n, **consts
    )
    recompute = deltanet_recompute()
    if recompute:  # five fp32 per-chunk tensors (~15 KiB per token at H 12, D 64) are rebuilt in backward
        ctx.save_for_backward(q, k, v, g, beta, S0)
    else:
        ctx.save_for_backward(q, k, v, g, beta, X, W, Kd, a, states, delta)
    ctx.meta = (scale, C, consts, S0 is not None, recompute)
    return o, final


def _backward(ctx, do, dfinal, dq, dk, dv):
    """The fused backward: writes the gradients of q, k, v into dq, dk, dv ((B, H, T, d) views laid out as
    ctx's consts say) and returns (dg, dbeta, dS0 or None)."""
    scale, C, consts, has_s0, recompute = ctx.meta
    if recompute:
        q, k, v, g, beta, S0 = ctx.saved_tensors
        X, W, Kd, a, states, delta, _ = chunk_pass(k, v, g, beta, S0, consts)
    else:
        q, k, v, g, beta, X, W, Kd, a, states, delta = ctx.saved_tensors
    B, H, T, K = k.shape
    V = v.shape[-1]
    n = a.shape[-1]
    f32 = dict(device=k.device, dtype=torch.float32)
    do = torch.zeros(B, H, T, V, **f32) if do is None else _last_dim_contiguous(do)
    gh, gdelta = torch.empty_like(states), torch.empty_like(delta)
    dk_out, dgamma_out = torch.empty(B, H, T, K, **f32), torch.empty(B, H, T, **f32)
    _output_bwd_kernel[(n, B * H)](
        q, k, g, states, delta, do, gh, gdelta, dq, dk_out, dgamma_out, scale,
        *_strides(q), *_strides(k), *_strides(do), *_strides(dq), T, H, n, **consts,
    )  # fmt: skip
    dU, dW, dKd, da, ds0 = state_pass_backward(W, Kd, a, states, delta, gh, gdelta, dfinal, consts["PRECISION"])
    dg, dbeta = torch.empty_like(dgamma_out), torch.empty_like(dgamma_out)
    _prep_bwd_kernel[(n, B * H)](
        k, v, g, beta, X, dU.contiguous(), dW.contiguous(), dKd.contiguous(), da.contiguous(), a, dk_out,
        dgamma_out, dk, dv, dg, dbeta, *_strides(k), *_strides(v), *_strides(dk), *_strides(dv), T, H, n,
        **{**consts, "BK": min(BLOCK_K, consts["BK"])},
    )  # fmt: skip
    return dg, dbeta, (ds0 if has_s0 else None)


class _FusedChunkwise(torch.autograd.Function):
    """q, k, v (B, H, T, d) views with the last dim contiguous; o and the gradients contiguous (B, H, T, d)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, S0, scale, C, qk_l2norm_eps):
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return _forward(ctx, q, k, v, g, beta, S0, scale, C, qk_l2norm_eps, head_last=False)

    @staticmethod
    def backward(ctx, do, dfinal):
        q = ctx.saved_tensors[0]
        K, V = ctx.meta[2]["K"], ctx.meta[2]["V"]
        dq, dk, dv = (_empty_out(q, d, dtype, False) for d, dtype in zip((K, K, V), ctx.dtypes))
        dg, dbeta, ds0 = _backward(ctx, do, dfinal, dq, dk, dv)
        return dq, dk, dv, dg, dbeta, ds0, None, None, None


class _FusedChunkwisePacked(torch.autograd.Function):
    """One head-last (B, T, 3, H, d) tensor of q, k, v in; o (B, H, T, d) as a view of a head-last tensor out,
    and in backward one (B, T, 3, H, d) gradient written by the kernels: no gradient of an unbind to stack."""

    @staticmethod
    def forward(ctx, qkv, g, beta, S0, scale, C, qk_l2norm_eps):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return _forward(ctx, q, k, v, g, beta, S0, scale, C, qk_l2norm_eps, head_last=True)

    @staticmethod
    def backward(ctx, do, dfinal):
        q = ctx.saved_tensors[0]
        B, H, T, K = q.shape
        dqkv = torch.empty(B, T, 3, H, K, device=q.device, dtype=q.dtype)
        dq, dk, dv = (t.transpose(1, 2) for t in dqkv.unbind(2))
        dg, dbeta, ds0 = _backward(ctx, do, dfinal, dq, dk, dv)
        return dqkv, dg, dbeta, ds0, None, None, None


def _norm_in_kernels(qk_l2norm_eps: Optional[float], chunk_size: int, K: int) -> Optional[float]:
    """The eps the kernels normalise q and k with, or None: no norm asked for, or a row of k wider than a tile."""
    if qk_l2norm_eps is None or not norm_fits_kernels(chunk_size, K):
        return None
    return float(qk_l2norm_eps)


def delta_rule_fused(
    q, k, v, g, beta, initial_state=None, scale=None, chunk_size: int = 64, qk_l2norm_eps: Optional[float] = None
):
    """Same contract as ``delta_rule_chunkwise``: o (B, H, T, d_v) in v's dtype and the fp32 final state; the
    gradients of q, k, v come in their dtypes (no fp32 copies of (B, H, T, d) tensors on the way).
    qk_l2norm_eps: q and k are raw and L2-normalised here (``l2_normalize``), inside the kernels where a row of k
    fits one tile (d_k <= 64), else in PyTorch first; their gradients are the raw q's and k's."""
    if triton is None:
        raise RuntimeError("delta_rule_fused needs the `triton` package")
    eps = _norm_in_kernels(qk_l2norm_eps, chunk_size, k.shape[-1])
    if qk_l2norm_eps is not None and eps is None:
        q, k = l2_normalize(q, qk_l2norm_eps), l2_normalize(k, qk_l2norm_eps)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    o, final = _FusedChunkwise.apply(q, k, v, g, beta, initial_state, float(scale), int(chunk_size), eps)
    return o, final


def delta_rule_fused_packed(
    qkv, g, beta, initial_state=None, scale=None, chunk_size: int = 64, qk_l2norm_eps: Optional[float] = None
):
    """``delta_rule_fused`` on one head-last tensor qkv (B, T, 3, H, d) (last dim contiguous), as a Gated
    DeltaNet layer holds q, k, v after its short conv; g, beta (B, H, T). Returns o (B, H, T, d) as a view of a
    (B, T, H, d) tensor, and the final state. The kernels write o and the gradients of q, k, v head-last, so the
    layer's layout needs no copies and its unbind no stacked gradient."""
    if triton is None:
        raise RuntimeError("delta_rule_fused_packed needs the `triton` package")
    eps = _norm_in_kernels(qk_l2norm_eps, chunk_size, qkv.shape[-1])
    if qk_l2norm_eps is not None and eps is None:  # wide heads: normalise first, then the unpacked kernels
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return delta_rule_fused(q, k, v, g, beta, initial_state, scale, chunk_size, qk_l2norm_eps)
    scale = qkv.shape[-1] ** -0.5 if scale is None else scale
    qkv = _last_dim_contiguous(qkv)
    return _FusedChunkwisePacked.apply(qkv, g, beta, initial_state, float(scale), int(chunk_size), eps)
