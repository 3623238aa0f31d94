"""Triton kernels for the one sequential part of the chunkwise delta rule: the pass over chunks.

``delta_rule_chunkwise`` turns each chunk into matrix products that run for all chunks at once; what is left
is a recurrence over chunks c = 0 .. n-1 on the (d_k, d_v) state S (see ``state_pass_torch`` in chunk.py):

    H_c     = S                          the state entering chunk c (kept: the outputs read it)
    delta_c = U_c - W_c S                (C, d_v)
    S       = a_c S + Kd_c^T delta_c     a_c = Gamma_C of chunk c, Kd_c = k * Gamma_C / Gamma

In PyTorch that loop is ~6 small kernel launches per chunk, forward and backward, and dominates the layer
(35 ms vs fla's 4.6 ms at B8 T4096 H16 D128 on an H200). Here one Triton program owns a (d_k, BV) slice of
one head's state in registers and walks all chunks; the backward walks them in reverse with the state's
gradient. Everything that does not need the sequence order (dU, dW, dKd, da) is then one batched matmul.

The kernels honour ``torch.get_float32_matmuldot_precision()``: "highest" uses IEEE fp32 dots, "high" and
"medium" TF32. They also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the test suite checks
them against ``state_pass_torch`` (chunk.py) without a GPU.
"""

from typing import Optional

import torch

from hydralm.kernels.triton_common import dot_precision, interpreting, tile_sizes, tl, triton


def _configs() -> list:
    """Tile width BV and pipeline depth (4 warps), tuned once per (C, K, V) on the GPU at hand (the best choice
    differs between d_k = 64 and 128). The CPU interpreter gets one config: it only checks the arithmetic."""
    if interpreting():
        return [triton.Config({"BV": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BV": bv}, num_warps=4, num_stages=s) for bv in (16, 32, 64) for s in (1, 2)]


if triton is not None:

    @triton.jit
    def _tile(
        i_v, C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr
    ):
        """Row/column ranges of this program's (d_k, BV) state tile, its flat offsets, and the masks of the
        state tile and of a chunk's (C, d_k) / (C, BV) tiles (padding past C, K, V reads 0)."""
        rc, rk, rv = tl.arange(0, BC), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
        kv = rk[:, None] * V + rv[None, :]
        m_kv = (rk < K)[:, None] & (rv < V)[None, :]
        m_ck, m_cv = (rc < C)[:, None] & (rk < K)[None, :], (rc < C)[:, None] & (rv < V)[None, :]
        return rc, rk, rv, kv, m_kv, m_ck, m_cv

    @triton.autotune(configs=_configs(), key=["C", "K", "V"])
    @triton.jit
    def _state_pass_fwd_kernel(
        u_ptr,
        w_ptr,
        kd_ptr,
        a_ptr,
        s0_ptr,
        h_ptr,
        delta_ptr,
        sn_ptr,
        n_chunks,
        C: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_S0: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rc, rk, rv, kv, m_kv, m_ck, m_cv = _tile(i_v, C, K, V, BC, BK, BV)
        if HAS_S0:
            S = tl.load(s0_ptr + i_bh * K * V + kv, mask=m_kv, other=0.0)
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)
        for c in range(n_chunks):
            chunk = i_bh * n_chunks + c
            tl.store(h_ptr + chunk * K * V + kv, S, mask=m_kv)
            ck, cv = chunk * C * K + rc[:, None] * K + rk[None, :], chunk * C * V + rc[:, None] * V + rv[None, :]
            w = tl.load(w_ptr + ck, mask=m_ck, other=0.0)
            delta = tl.load(u_ptr + cv, mask=m_cv, other=0.0) - tl.dot(w, S, input_precision=PRECISION)
            tl.store(delta_ptr + cv, delta, mask=m_cv)
            kd = tl.load(kd_ptr + ck, mask=m_ck, other=0.0)
            S = S * tl.load(a_ptr + chunk) + tl.dot(tl.trans(kd), delta, input_precision=PRECISION)
        tl.store(sn_ptr + i_bh * K * V + kv, S, mask=m_kv)

    @triton.autotune(configs=_configs(), key=["C", "K", "V"])
    @triton.jit
    def _state_pass_bwd_kernel(
        w_ptr,
        kd_ptr,
        a_ptr,
        gh_ptr,
        gdelta_ptr,
        gsn_ptr,
        dsnext_ptr,
        ddelta_ptr,
        ds0_ptr,
        n_chunks,
        C: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_GSN: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Reverse pass: dS is the gradient of the state leaving chunk c; stores it and d(delta_c)."""
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rc, rk, rv, kv, m_kv, m_ck, m_cv = _tile(i_v, C, K, V, BC, BK, BV)
        if HAS_GSN:
            dS = tl.load(gsn_ptr + i_bh * K * V + kv, mask=m_kv, other=0.0)
        else:
            dS = tl.zeros([BK, BV], dtype=tl.float32)
        for step in range(n_chunks):
            chunk = i_bh * n_chunks + (n_chunks - 1 - step)
            tl.store(dsnext_ptr + chunk * K * V + kv, dS, mask=m_kv)
            ck, cv = chunk * C * K + rc[:, None] * K + rk[None, :], chunk * C * V + rc[:, None] * V + rv[None, :]
            kd = tl.load(kd_ptr + ck, mask=m_ck, other=0.0)
            ddelta = tl.load(gdelta_ptr + cv, mask=m_cv, other=0.0) + tl.dot(kd, dS, input_precision=PRECISION)
            tl.store(ddelta_ptr + cv, ddelta, mask=m_cv)
            w = tl.load(w_ptr + ck, mask=m_ck, other=0.0)
            dS = (
                dS * tl.load(a_ptr + chunk)
                - tl.dot(tl.trans(w), ddelta, input_precision=PRECISION)
                + tl.load(gh_ptr + chunk * K * V + kv, mask=m_kv, other=0.0)
            )
        tl.store(ds0_ptr + i_bh * K * V + kv, dS, mask=m_kv)


def state_pass_forward(U, W, Kd, a, S0):
    """The forward kernel: (H, delta, final state), all fp32. U, W, Kd, a contiguous fp32; S0 fp32 or None."""
    B, H, n, C, K = W.shape
    V = U.shape[-1]
    h = U.new_empty(B, H, n, K, V)
    delta = torch.empty_like(U)
    sn = U.new_empty(B, H, K, V)
    BC, BK = tile_sizes(C, K)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), B * H)  # noqa: E731
    _state_pass_fwd_kernel[grid](
        U,
        W,
        Kd,
        a,
        S0 if S0 is not None else sn,
        h,
        delta,
        sn,
        n,
        C=C,
        K=K,
        V=V,
        BC=BC,
        BK=BK,
        HAS_S0=S0 is not None,
        PRECISION=dot_precision(),
    )
    return h, delta, sn


def state_pass_backward(W, Kd, a, h, delta, gh, gdelta, gsn):
    """Gradients (dU, dW, dKd, da, dS0) from those of H, delta (fp32 or None) and the final state (or None)."""
    B, H, n, C, K = W.shape
    V = delta.shape[-1]
    gh = torch.zeros_like(h) if gh is None else gh.float().contiguous()
    gdelta = torch.zeros_like(delta) if gdelta is None else gdelta.float().contiguous()
    gsn = None if gsn is None else gsn.float().contiguous()
    dsnext, ddelta = torch.empty_like(h), torch.empty_like(delta)
    ds0 = h.new_empty(B, H, K, V)
    BC, BK = tile_sizes(C, K)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), B * H)  # noqa: E731
    _state_pass_bwd_kernel[grid](
        W,
        Kd,
        a,
        gh,
        gdelta,
        gsn if gsn is not None else ds0,
        dsnext,
        ddelta,
        ds0,
        n,
        C=C,
        K=K,
        V=V,
        BC=BC,
        BK=BK,
        HAS_GSN=gsn is not None,
        PRECISION=dot_precision(),
    )
    # The parts that need no order: one batched matmul each, in fp32 even when backward is called inside an
    # autocast region (autograd runs backward under the caller's autocast state, which would make them bf16).
    with torch.autocast(h.device.type, enabled=False):
        dW = -(ddelta @ h.transpose(-1, -2))
        dKd = delta @ dsnext.transpose(-1, -2)
    da = (h * dsnext).sum((-1, -2))
    return ddelta, dW, dKd, da, ds0


class _StatePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, U, W, Kd, a, S0):
        U, W, Kd, a = (t.float().contiguous() for t in (U, W, Kd, a))
        h, delta, sn = state_pass_forward(U, W, Kd, a, None if S0 is None else S0.float().contiguous())
        ctx.save_for_backward(W, Kd, a, h, delta)
        ctx.has_s0 = S0 is not None
        return h, delta, sn

    @staticmethod
    def backward(ctx, gh, gdelta, gsn):
        dU, dW, dKd, da, ds0 = state_pass_backward(*ctx.saved_tensors, gh, gdelta, gsn)
        return dU, dW, dKd, da, (ds0 if ctx.has_s0 else None)


def state_pass_triton(U, W, Kd, a, S0: Optional[torch.Tensor]):
    """Same contract as ``state_pass_torch`` (S0 may be None for zeros); fp32 outputs."""
    if triton is None:
        raise RuntimeError("state_pass_triton needs the `triton` package")
    return _StatePass.apply(U, W, Kd, a, S0)
