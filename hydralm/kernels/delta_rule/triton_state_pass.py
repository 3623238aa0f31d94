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

The kernels honour ``torch.get_float32_matmul_precision()`` ("highest" uses IEEE fp32 dots, "high" and
"medium" TF32) unless the caller passes the precision (the fused delta rule passes its inputs':
`dot_precision`). They also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the test suite
checks them against ``state_pass_torch`` (chunk.py) without a GPU.
"""

from typing import Optional

import torch

from hydralm.kernels.triton_common import SIXTEEN_BIT_DOTS, dot, dot_precision, interpreting, tile_sizes, tl, triton

# Chunks per segment of the segmented pass (below); None = chosen from the shape (`segment_chunks`). Tests and
# benchmarks set it to force a segment length.
SEGMENT_CHUNKS: Optional[int] = None
# The choice, from the fused delta rule at H 12 K 64 on an H200 (fwd+bwd, bf16, `python -m benchmarks.speed
# state_pass`, fd49f69): 12 sequences of 1024 chunks took 14.5 ms walked whole and 9.7 ms in segments of 32
# (9.9 / 9.9 at 16 / 64); 48 sequences of 256 chunks took 8.3 ms whole and 9.6 ms in segments of 32.
SEGMENT_MAX_SEQUENCES = 32  # more (batch x head) sequences than this fill the GPU walked whole
SEGMENT_LEN = 32
SCAN_BV = 32


def _configs() -> list:
    """Tile width BV and pipeline depth (4 warps), tuned once per (C, K, V, state columns) on the GPU at hand
    (the best choice differs between d_k = 64 and 128). The CPU interpreter gets one config: it only checks
    the arithmetic."""
    if interpreting():
        return [triton.Config({"BV": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BV": bv}, num_warps=4, num_stages=s) for bv in (16, 32, 64) for s in (1, 2)]


def segment_chunks(n: int, programs: int) -> int:
    """Chunks per segment for a pass over n chunks with `programs` = batch x heads sequences: n (one
    sequential walk each) unless the sequences are few and the walk long, where the walk's latency, one chunk
    after another, dominates and segments pay for the segmented pass's extra work (about 3x the chunk steps)."""
    if SEGMENT_CHUNKS is not None:
        return max(1, min(n, SEGMENT_CHUNKS))
    if programs > SEGMENT_MAX_SEQUENCES or n < 4 * SEGMENT_LEN:
        return n
    return SEGMENT_LEN


if triton is not None:

    @triton.jit
    def _tile(
        i_v,
        C: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        VS: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        TRANSITION: tl.constexpr,
    ):
        """This program's (d_k, BV) tile of the state's VS columns: its offsets and mask, and for a chunk's
        (C, d_k) and (C, V) tiles their offsets and masks (padding past C, K, V reads 0). In the transition
        pass the state is [M | S] (VS = K + V columns): the first K carry the transition matrix and read no U."""
        rc, rk, rs = tl.arange(0, BC), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
        ru = rs - K if TRANSITION else rs  # the state column's column in U / delta
        kv = rk[:, None] * VS + rs[None, :]
        m_kv = (rk < K)[:, None] & (rs < VS)[None, :]
        ck, m_ck = rc[:, None] * K + rk[None, :], (rc < C)[:, None] & (rk < K)[None, :]
        cv, m_cv = rc[:, None] * V + ru[None, :], (rc < C)[:, None] & ((ru >= 0) & (ru < V))[None, :]
        return rk, rs, ru, kv, m_kv, ck, m_ck, cv, m_cv

    @triton.jit
    def _segment(i_bhs, n_chunks, seg_len, n_segs):
        """The (batch x head) sequence of program row i_bhs and its chunk range [start, stop)."""
        i_bh, seg = i_bhs // n_segs, i_bhs % n_segs
        start = seg * seg_len
        return i_bh, start, tl.minimum(start + seg_len, n_chunks)

    @triton.autotune(configs=_configs(), key=["C", "K", "V", "VS"])
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
        seg_len,
        n_segs,
        C: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        VS: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_S0: tl.constexpr,
        TRANSITION: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One segment of one sequence, from its entering state (s0, or 0) to its leaving state (sn), storing
        H and delta on the way. TRANSITION: the state starts as [I | 0] and nothing is stored but the end, the
        segment's affine map S_out = M S_in + S_0out as [M | S_0out]."""
        i_v, i_bhs = tl.program_id(0), tl.program_id(1).to(tl.int64)
        i_bh, start, stop = _segment(i_bhs, n_chunks, seg_len, n_segs)
        rk, rs, ru, kv, m_kv, ck, m_ck, cv, m_cv = _tile(i_v, C, K, V, VS, BC, BK, BV, TRANSITION)
        if TRANSITION:
            S = tl.where((rk[:, None] == rs[None, :]) & m_kv, 1.0, 0.0)
        elif HAS_S0:
            S = tl.load(s0_ptr + i_bhs * K * VS + kv, mask=m_kv, other=0.0)
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)
        for c in range(start, stop):
            chunk = i_bh * n_chunks + c
            if not TRANSITION:
                tl.store(h_ptr + chunk * K * V + kv, S, mask=m_kv)
            w = tl.load(w_ptr + chunk * C * K + ck, mask=m_ck, other=0.0)
            delta = tl.load(u_ptr + chunk * C * V + cv, mask=m_cv, other=0.0) - dot(w, S, PRECISION)
            if not TRANSITION:
                tl.store(delta_ptr + chunk * C * V + cv, delta, mask=m_cv)
            kd = tl.load(kd_ptr + chunk * C * K + ck, mask=m_ck, other=0.0)
            S = S * tl.load(a_ptr + chunk) + dot(tl.trans(kd), delta, PRECISION)
        tl.store(sn_ptr + i_bhs * K * VS + kv, S, mask=m_kv)

    @triton.autotune(configs=_configs(), key=["C", "K", "V", "VS"])
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
        seg_len,
        n_segs,
        C: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        VS: tl.constexpr,
        BC: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_GSN: tl.constexpr,
        TRANSITION: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Reverse pass over one segment: dS is the gradient of the state leaving chunk c; stores it and
        d(delta_c), and at the end the gradient of the state entering the segment. TRANSITION: dS starts as
        [I | 0] and only the end is stored, the affine map dS_in = M dS_out + dS_0in as [M | dS_0in]."""
        i_v, i_bhs = tl.program_id(0), tl.program_id(1).to(tl.int64)
        i_bh, start, stop = _segment(i_bhs, n_chunks, seg_len, n_segs)
        rk, rs, ru, kv, m_kv, ck, m_ck, cv, m_cv = _tile(i_v, C, K, V, VS, BC, BK, BV, TRANSITION)
        kv_u, m_kv_u = rk[:, None] * V + ru[None, :], (rk < K)[:, None] & ((ru >= 0) & (ru < V))[None, :]
        if TRANSITION:
            dS = tl.where((rk[:, None] == rs[None, :]) & m_kv, 1.0, 0.0)
        elif HAS_GSN:
            dS = tl.load(gsn_ptr + i_bhs * K * VS + kv, mask=m_kv, other=0.0)
        else:
            dS = tl.zeros([BK, BV], dtype=tl.float32)
        for step in range(stop - start):
            chunk = i_bh * n_chunks + (stop - 1 - step)
            if not TRANSITION:
                tl.store(dsnext_ptr + chunk * K * V + kv, dS, mask=m_kv)
            kd = tl.load(kd_ptr + chunk * C * K + ck, mask=m_ck, other=0.0)
            gdelta = tl.load(gdelta_ptr + chunk * C * V + cv, mask=m_cv, other=0.0)
            ddelta = gdelta + dot(kd, dS, PRECISION)
            if not TRANSITION:
                tl.store(ddelta_ptr + chunk * C * V + cv, ddelta, mask=m_cv)
            w = tl.load(w_ptr + chunk * C * K + ck, mask=m_ck, other=0.0)
            dS = (
                dS * tl.load(a_ptr + chunk)
                - dot(tl.trans(w), ddelta, PRECISION)
                + tl.load(gh_ptr + chunk * K * V + kv_u, mask=m_kv_u, other=0.0)
            )
        tl.store(ds0_ptr + i_bhs * K * VS + kv, dS, mask=m_kv)

    @triton.jit
    def _segment_scan_kernel(
        map_ptr,
        s0_ptr,
        out_ptr,
        n_segs,
        K: tl.constexpr,
        V: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_S0: tl.constexpr,
        REVERSE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """The segments' maps [M | S_0] applied in order (reverse order for gradients): stores the state each
        segment starts from, S_next = M S + S_0."""
        i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rk, rm, rv = tl.arange(0, BK), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
        m_kv, m_kk = (rk < K)[:, None] & (rv < V)[None, :], (rk < K)[:, None] & (rm < K)[None, :]
        kv = rk[:, None] * V + rv[None, :]
        if HAS_S0:
            S = tl.load(s0_ptr + i_bh * K * V + kv, mask=m_kv, other=0.0)
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)
        for step in range(n_segs):
            seg = i_bh * n_segs + (n_segs - 1 - step if REVERSE else step)
            tl.store(out_ptr + seg * K * V + kv, S, mask=m_kv)
            base = map_ptr + seg * K * (K + V) + rk[:, None] * (K + V)
            M = tl.load(base + rm[None, :], mask=m_kk, other=0.0)
            S = dot(M, S, PRECISION) + tl.load(base + K + rv[None, :], mask=m_kv, other=0.0)


def _launch_fwd(U, W, Kd, a, S0, h, delta, sn, seg_len: int, n_segs: int, transition: bool, precision: str) -> None:
    B, H, n, C, K = W.shape
    V = U.shape[-1]
    VS = K + V if transition else V
    BC, BK = tile_sizes(C, K)
    grid = lambda meta: (triton.cdiv(VS, meta["BV"]), B * H * n_segs)  # noqa: E731
    _state_pass_fwd_kernel[grid](
        U, W, Kd, a, S0 if S0 is not None else sn, h, delta, sn, n, seg_len, n_segs,
        C=C, K=K, V=V, VS=VS, BC=BC, BK=BK, HAS_S0=S0 is not None, TRANSITION=transition,
        PRECISION=precision,
    )  # fmt: skip


def _launch_bwd(
    W, Kd, a, gh, gdelta, gsn, dsnext, ddelta, ds0, seg_len: int, n_segs: int, transition: bool, precision: str
):
    B, H, n, C, K = W.shape
    V = gdelta.shape[-1]
    VS = K + V if transition else V
    BC, BK = tile_sizes(C, K)
    grid = lambda meta: (triton.cdiv(VS, meta["BV"]), B * H * n_segs)  # noqa: E731
    _state_pass_bwd_kernel[grid](
        W, Kd, a, gh, gdelta, gsn if gsn is not None else ds0, dsnext, ddelta, ds0, n, seg_len, n_segs,
        C=C, K=K, V=V, VS=VS, BC=BC, BK=BK, HAS_GSN=gsn is not None, TRANSITION=transition,
        PRECISION=precision,
    )  # fmt: skip


def _scan_segments(maps: torch.Tensor, S0: Optional[torch.Tensor], reverse: bool, precision: str) -> torch.Tensor:
    """maps (B, H, n_segs, K, K + V) -> the state each segment starts from (B, H, n_segs, K, V)."""
    B, H, n_segs, K, KV = maps.shape
    V = KV - K
    out = maps.new_empty(B, H, n_segs, K, V)
    BK = max(16, triton.next_power_of_2(K))
    # products of segment maps keep fp32 operands: rounding them to 16 bits would compound over the segments
    _segment_scan_kernel[(triton.cdiv(V, SCAN_BV), B * H)](
        maps, S0 if S0 is not None else out, out, n_segs, K=K, V=V, BK=BK, BV=SCAN_BV, HAS_S0=S0 is not None,
        REVERSE=reverse, PRECISION="tf32" if precision in SIXTEEN_BIT_DOTS.values() else precision,
    )  # fmt: skip
    return out


def state_pass_forward(U, W, Kd, a, S0, precision: Optional[str] = None):
    """The forward kernel: (H, delta, final state), all fp32. U, W, Kd, a contiguous fp32; S0 fp32 or None.

    A long pass over few (batch x head) sequences is latency-bound: one program walks all n chunks, one after
    another. There the chunks are cut into segments (``segment_chunks``) and walked in three steps, each
    parallel over segments except the short second one: (1) every segment's affine map S_out = M S_in + S_0out
    (the state pass itself over the columns [M | S], from [I | 0]); (2) the maps applied in order, giving the
    state each segment starts from; (3) the pass over every segment from that state, storing H and delta.
    precision: the dots' ("ieee", "tf32", or "bf16" / "fp16": 16-bit operands, triton_common.dot; None:
    `dot_precision()`)."""
    precision = precision or dot_precision()
    B, H, n, C, K = W.shape
    V = U.shape[-1]
    h, delta = U.new_empty(B, H, n, K, V), torch.empty_like(U)
    seg_len = segment_chunks(n, B * H)
    n_segs = triton.cdiv(n, seg_len)
    if n_segs == 1:
        sn = U.new_empty(B, H, K, V)
        _launch_fwd(U, W, Kd, a, S0, h, delta, sn, n, 1, transition=False, precision=precision)
        return h, delta, sn
    maps = U.new_empty(B, H, n_segs, K, K + V)
    _launch_fwd(U, W, Kd, a, None, h, delta, maps, seg_len, n_segs, transition=True, precision=precision)
    starts = _scan_segments(maps, S0, reverse=False, precision=precision)
    ends = U.new_empty(B, H, n_segs, K, V)
    _launch_fwd(U, W, Kd, a, starts, h, delta, ends, seg_len, n_segs, transition=False, precision=precision)
    return h, delta, ends[:, :, -1].contiguous()


def state_pass_backward(W, Kd, a, h, delta, gh, gdelta, gsn, precision: Optional[str] = None):
    """Gradients (dU, dW, dKd, da, dS0) from those of H, delta (fp32 or None) and the final state (or None);
    segmented like the forward when the walk is long and the sequences few."""
    precision = precision or dot_precision()
    B, H, n, C, K = W.shape
    V = delta.shape[-1]
    gh = torch.zeros_like(h) if gh is None else gh.float().contiguous()
    gdelta = torch.zeros_like(delta) if gdelta is None else gdelta.float().contiguous()
    gsn = None if gsn is None else gsn.float().contiguous()
    dsnext, ddelta = torch.empty_like(h), torch.empty_like(delta)
    seg_len = segment_chunks(n, B * H)
    n_segs = triton.cdiv(n, seg_len)
    if n_segs == 1:
        ds0 = h.new_empty(B, H, K, V)
        _launch_bwd(W, Kd, a, gh, gdelta, gsn, dsnext, ddelta, ds0, n, 1, False, precision)
    else:
        maps = h.new_empty(B, H, n_segs, K, K + V)
        _launch_bwd(W, Kd, a, gh, gdelta, None, dsnext, ddelta, maps, seg_len, n_segs, True, precision)
        # the gradient of the state leaving each segment
        leaving = _scan_segments(maps, gsn, reverse=True, precision=precision)
        entering = h.new_empty(B, H, n_segs, K, V)
        _launch_bwd(W, Kd, a, gh, gdelta, leaving, dsnext, ddelta, entering, seg_len, n_segs, False, precision)
        ds0 = entering[:, :, 0].contiguous()
    # The parts that need no order: one batched matmul each, in fp32 even when backward is called inside an
    # autocast region (autograd runs backward under the caller's autocast state, which would make them bf16);
    # dW's minus sign as the matmul's alpha, not a negation pass over a (B, H, n, C, d_k) tensor
    with torch.autocast(h.device.type, enabled=False):
        rows, states = ddelta.reshape(-1, C, V), h.reshape(-1, K, V)
        dW = torch.baddbmm(rows.new_empty(rows.shape[0], C, K), rows, states.transpose(1, 2), beta=0, alpha=-1)
        dW = dW.view(B, H, n, C, K)
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
