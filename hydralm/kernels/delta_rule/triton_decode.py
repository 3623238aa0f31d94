"""One decode step of a Gated DeltaNet layer as one Triton kernel (backend HYDRALM_DECODE=fused).

The PyTorch step (``GatedDeltaNet.step``) launches a few dozen small kernels per layer and token: the short
conv over its cache, SiLU, the q/k L2 norms, the gates, the delta-rule update and readout, the gated RMSNorm.
At batch 1 a CUDA-graph decode step is bound by those launches, not by reading the weights. Here everything
between the input projection's output and the output projection's input is one program per (row, head):

    conv window [cache | x_t] . w  -> SiLU -> q, k L2-normalised (eps 1e-6), v
    g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)
    S <- exp(g) (S - beta k (k^T S)) + beta k v^T        (fp32, D x D in registers)
    o = D^-1/2 q^T S, rounded to the projection's dtype, then RMSNorm * weight (* SiLU(gate))

Same formulas and order as the PyTorch step (the test oracle, tests/test_gdn_decode_fused.py). The new state and
conv cache are new tensors, so callers that keep the old state (speculative rollback) still can; or, in
``gated_deltanet_step_fused_``, written over the old ones in place (a StaticDecoder's own buffers: no copy back).
Each program reads its (D, D) state tile and its conv channels before it writes them, and no other program
touches them, so the in-place form computes the same values.
"""

from typing import Tuple

import torch

from hydralm.kernels.triton_common import tl, triton

# Warps of the one-token kernel. Timed alone as a CUDA graph on an H200 (bf16 projections, H 12, D 64, 55ad51c):
# 4.0 / 5.0 / 5.6 / 7.2 us at 2 / 4 / 8 / 16 warps for one row, 7.5 / 12.8 / 18.2 / 29.4 us for 64 rows. Fewer
# warps spill more of the (D, D) fp32 state to the stack (about 500 B a thread at 4 warps, none at 8, sm_90), but
# the spills stay in L1 and the block's reductions get shorter.
STEP_WARPS = 2
# Warps of the T-token kernel: its state and the products of it spill 1.6 KB a thread at 4 warps and 32 B at 8.
STEPS_WARPS = 8

if triton is not None:
    # torch.nn.functional.softplus returns x as is above it; a kernel reads only constexpr globals
    SOFTPLUS_THRESHOLD = tl.constexpr(20.0)

    @triton.jit
    def _conv_silu(
        proj, cache, conv_w, cache_out, row, c0, d, m,
        stride_pb, stride_cb, stride_ct, stride_ob, stride_ot,
        K: tl.constexpr,
    ):  # fmt: skip
        """SiLU of the causal conv at the newest token for channels c0 + d; shifts the cache into cache_out."""
        x = tl.load(proj + row * stride_pb + c0 + d, mask=m, other=0.0)
        acc = x.to(tl.float32) * tl.load(conv_w + (c0 + d) * K + (K - 1), mask=m, other=0.0).to(tl.float32)
        for j in tl.static_range(K - 1):
            past = tl.load(cache + row * stride_cb + j * stride_ct + c0 + d, mask=m, other=0.0).to(x.dtype)
            acc += past.to(tl.float32) * tl.load(conv_w + (c0 + d) * K + j, mask=m, other=0.0).to(tl.float32)
            if j > 0:
                tl.store(cache_out + row * stride_ob + (j - 1) * stride_ot + c0 + d, past, mask=m)
        if K > 1:
            tl.store(cache_out + row * stride_ob + (K - 2) * stride_ot + c0 + d, x, mask=m)
        y = acc.to(x.dtype).to(tl.float32)  # the PyTorch step's conv output is in the projection's dtype
        return (y * tl.sigmoid(y)).to(x.dtype).to(tl.float32)

    @triton.jit
    def _qk_normed(q, k, dtype, NORM_QK: tl.constexpr):
        """F.normalize: x / max(|x|, eps), in the projection's dtype."""
        if NORM_QK:
            q = (q / tl.maximum(tl.sqrt(tl.sum(q * q, 0)), 1e-6)).to(dtype).to(tl.float32)
            k = (k / tl.maximum(tl.sqrt(tl.sum(k * k, 0)), 1e-6)).to(dtype).to(tl.float32)
        return q, k

    @triton.jit
    def _update_and_read(
        proj_row, A_log, dt_bias, state, q, k, v, norm_w, h, H, HD, D, d, m, norm_eps, scale, out_dtype,
        USE_GATE: tl.constexpr,
    ):  # fmt: skip
        """One token of head h given its row of the input projection's output: the gates, the delta-rule update
        of `state` and its readout through the gated RMSNorm. Returns (new state, y)."""
        a = tl.load(proj_row + 3 * HD + h).to(tl.float32) + tl.load(dt_bias + h).to(tl.float32)
        softplus = tl.where(a > SOFTPLUS_THRESHOLD, a, tl.log(1.0 + tl.exp(a)))
        decay = tl.exp(-tl.exp(tl.load(A_log + h).to(tl.float32)) * softplus)
        beta = tl.sigmoid(tl.load(proj_row + 3 * HD + H + h).to(tl.float32))
        kS = tl.sum(k[:, None] * state, 0)  # k^T S
        state = decay * (state - beta * k[:, None] * kS[None, :]) + beta * k[:, None] * v[None, :]

        o = scale * tl.sum(q[:, None] * state, 0)
        o = o.to(out_dtype).to(tl.float32)  # the PyTorch step normalises o in the layer input's dtype
        rstd = 1.0 / tl.sqrt(tl.sum(o * o, 0) / D + norm_eps)
        y = o * rstd * tl.load(norm_w + d, mask=m, other=0.0).to(tl.float32)
        if USE_GATE:
            gate = tl.load(proj_row + 3 * HD + 2 * H + h * D + d, mask=m, other=0.0).to(tl.float32)
            y = y * gate * tl.sigmoid(gate)
        return state, y

    @triton.jit
    def _gdn_step_kernel(
        proj, cache, conv_w, A_log, dt_bias, S, norm_w, out, S_out, cache_out,
        stride_pb, stride_cb, stride_ct, stride_ob, stride_ot,
        H, D, norm_eps, scale,
        K: tl.constexpr, BLOCK_D: tl.constexpr, NORM_QK: tl.constexpr, USE_GATE: tl.constexpr,
    ):  # fmt: skip
        row, h = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        HD = H * D
        q = _conv_silu(proj, cache, conv_w, cache_out, row, h * D, d, m,
                       stride_pb, stride_cb, stride_ct, stride_ob, stride_ot, K)  # fmt: skip
        k = _conv_silu(proj, cache, conv_w, cache_out, row, HD + h * D, d, m,
                       stride_pb, stride_cb, stride_ct, stride_ob, stride_ot, K)  # fmt: skip
        v = _conv_silu(proj, cache, conv_w, cache_out, row, 2 * HD + h * D, d, m,
                       stride_pb, stride_cb, stride_ct, stride_ob, stride_ot, K)  # fmt: skip
        q, k = _qk_normed(q, k, proj.dtype.element_ty, NORM_QK)

        tile = ((row * H + h) * D + d[:, None]) * D + d[None, :]  # S[row, h] is (D_k, D_v), row-major
        tile_mask = m[:, None] & m[None, :]
        state = tl.load(S + tile, mask=tile_mask, other=0.0)
        state, y = _update_and_read(proj + row * stride_pb, A_log, dt_bias, state, q, k, v, norm_w, h, H, HD, D,
                                    d, m, norm_eps, scale, out.dtype.element_ty, USE_GATE)  # fmt: skip
        tl.store(S_out + tile, state, mask=tile_mask)
        tl.store(out + row * HD + h * D + d, y, mask=m)

    @triton.jit
    def _conv_silu_at(proj, cache, conv_w, row, t, c0, d, m, stride_pb, stride_pt, stride_cb, stride_ct,
                      K: tl.constexpr):  # fmt: skip
        """``_conv_silu`` for token t of a multi-token call: its window is the sequence [cache | proj's tokens]
        at t .. t + K - 1 (cache entries first while t < K - 1), in the same order of summation. Not shared with
        ``_conv_silu``: written through this one, the one-token kernel spilled more (624 against 504 B of stack a
        thread compiled for sm_90 at 4 warps)."""
        x = tl.load(proj + row * stride_pb + t * stride_pt + c0 + d, mask=m, other=0.0)
        acc = x.to(tl.float32) * tl.load(conv_w + (c0 + d) * K + (K - 1), mask=m, other=0.0).to(tl.float32)
        for j in tl.static_range(K - 1):
            if t + j < K - 1:
                past = tl.load(cache + row * stride_cb + (t + j) * stride_ct + c0 + d, mask=m, other=0.0).to(x.dtype)
            else:
                past = tl.load(proj + row * stride_pb + (t + j - (K - 1)) * stride_pt + c0 + d, mask=m, other=0.0)
            acc += past.to(tl.float32) * tl.load(conv_w + (c0 + d) * K + j, mask=m, other=0.0).to(tl.float32)
        y = acc.to(x.dtype).to(tl.float32)
        return (y * tl.sigmoid(y)).to(x.dtype).to(tl.float32)

    @triton.jit
    def _gdn_steps_kernel(
        proj, cache, conv_w, A_log, dt_bias, S, norm_w, out, S_trail,
        stride_pb, stride_pt, stride_cb, stride_ct,
        H, D, norm_eps, scale,
        T: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr, NORM_QK: tl.constexpr, USE_GATE: tl.constexpr,
    ):  # fmt: skip
        """T tokens of head h in one program: the state stays in registers between them; after each token its
        state goes to S_trail[row, t, h] and its output to out[row, t]."""
        row, h = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        HD = H * D
        square = d[:, None] * D + d[None, :]
        tile_mask = m[:, None] & m[None, :]
        state = tl.load(S + (row * H + h) * D * D + square, mask=tile_mask, other=0.0)
        for t in tl.static_range(T):
            q = _conv_silu_at(proj, cache, conv_w, row, t, h * D, d, m, stride_pb, stride_pt, stride_cb, stride_ct, K)
            k = _conv_silu_at(proj, cache, conv_w, row, t, HD + h * D, d, m,
                              stride_pb, stride_pt, stride_cb, stride_ct, K)  # fmt: skip
            v = _conv_silu_at(proj, cache, conv_w, row, t, 2 * HD + h * D, d, m,
                              stride_pb, stride_pt, stride_cb, stride_ct, K)  # fmt: skip
            q, k = _qk_normed(q, k, proj.dtype.element_ty, NORM_QK)
            state, y = _update_and_read(proj + row * stride_pb + t * stride_pt, A_log, dt_bias, state, q, k, v,
                                        norm_w, h, H, HD, D, d, m, norm_eps, scale, out.dtype.element_ty,
                                        USE_GATE)  # fmt: skip
            tl.store(S_trail + ((row * T + t) * H + h) * D * D + square, state, mask=tile_mask)
            tl.store(out + (row * T + t) * HD + h * D + d, y, mask=m)


@torch.library.custom_op("hydralm::gated_deltanet_step", mutates_args=())
def gated_deltanet_step_fused(
    proj: torch.Tensor,
    cache: torch.Tensor,
    conv_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    S: torch.Tensor,
    norm_weight: torch.Tensor,
    n_heads: int,
    head_dim: int,
    norm_eps: float,
    norm_qk: bool,
    use_gate: bool,
    out_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """proj (B, 3 H D + 2 H [+ H D]) the input projection's output for one token; cache (B, K - 1, 3 H D);
    conv_weight (3 H D, 1, K); S (B, H, D, D) fp32; out_dtype the layer input's dtype (the PyTorch step rounds
    the delta-rule output to it before the norm). Returns (o (B, H D) for the output projection, new S, new
    cache), all new tensors. A custom op: torch.compile(fullgraph=True) (the StaticDecoder's graphs) keeps it as
    one opaque call."""
    proj, cache, S = proj.contiguous(), cache.contiguous(), S.contiguous()
    out, S_out, cache_out = _outputs(proj, S, n_heads, head_dim, conv_weight.shape[-1], out_dtype)
    _launch(proj, cache, conv_weight, A_log, dt_bias, S, norm_weight, out, S_out, cache_out, n_heads, head_dim,
            norm_eps, norm_qk, use_gate)  # fmt: skip
    return out, S_out, cache_out


@torch.library.custom_op("hydralm::gated_deltanet_step_", mutates_args=("cache", "S"))
def gated_deltanet_step_fused_(
    proj: torch.Tensor,
    cache: torch.Tensor,
    conv_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    S: torch.Tensor,
    norm_weight: torch.Tensor,
    n_heads: int,
    head_dim: int,
    norm_eps: float,
    norm_qk: bool,
    use_gate: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``gated_deltanet_step_fused`` writing the new S and conv cache over `S` and `cache` (contiguous) in place;
    returns o."""
    if not (cache.is_contiguous() and S.is_contiguous()):
        raise ValueError("gated_deltanet_step_fused_ updates S and cache in place: both must be contiguous")
    proj = proj.contiguous()
    out = _outputs(proj, S, n_heads, head_dim, conv_weight.shape[-1], out_dtype)[0]
    _launch(proj, cache, conv_weight, A_log, dt_bias, S, norm_weight, out, S, cache, n_heads, head_dim, norm_eps,
            norm_qk, use_gate)  # fmt: skip
    return out


def _launch(proj, cache, conv_weight, A_log, dt_bias, S, norm_weight, out, S_out, cache_out, n_heads, head_dim,
            norm_eps, norm_qk, use_gate):  # fmt: skip
    B, H, D = proj.shape[0], n_heads, head_dim
    K = conv_weight.shape[-1]
    _gdn_step_kernel[(B, H)](
        proj, cache, conv_weight.reshape(3 * H * D, K).contiguous(), A_log, dt_bias, S, norm_weight,
        out, S_out, cache_out,
        proj.stride(0), cache.stride(0), cache.stride(1), cache_out.stride(0), cache_out.stride(1),
        H, D, norm_eps, D**-0.5,
        K=K, BLOCK_D=triton.next_power_of_2(D), NORM_QK=norm_qk, USE_GATE=use_gate, num_warps=STEP_WARPS,
    )  # fmt: skip


def _outputs(proj, S, n_heads, head_dim, K, out_dtype):
    B, inner = proj.shape[0], n_heads * head_dim
    out = torch.empty(B, inner, device=proj.device, dtype=out_dtype)
    cache_out = torch.empty(B, K - 1, 3 * inner, device=proj.device, dtype=proj.dtype)
    return out, torch.empty_like(S, memory_format=torch.contiguous_format), cache_out


@gated_deltanet_step_fused.register_fake
def _(proj, cache, conv_weight, A_log, dt_bias, S, norm_weight, n_heads, head_dim, norm_eps, norm_qk, use_gate,
      out_dtype):  # fmt: skip
    return _outputs(proj, S, n_heads, head_dim, conv_weight.shape[-1], out_dtype)


@gated_deltanet_step_fused_.register_fake
def _(proj, cache, conv_weight, A_log, dt_bias, S, norm_weight, n_heads, head_dim, norm_eps, norm_qk, use_gate,
      out_dtype):  # fmt: skip
    return _outputs(proj, S, n_heads, head_dim, conv_weight.shape[-1], out_dtype)[0]


@torch.library.custom_op("hydralm::gated_deltanet_steps", mutates_args=())
def gated_deltanet_steps_fused(
    proj: torch.Tensor,
    cache: torch.Tensor,
    conv_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    S: torch.Tensor,
    norm_weight: torch.Tensor,
    n_heads: int,
    head_dim: int,
    norm_eps: float,
    norm_qk: bool,
    use_gate: bool,
    out_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """T tokens in one launch (HYDRALM_DECODE_MANY=looped): proj (B, T, 3 H D + 2 H [+ H D]) the input
    projection's output for the T tokens, the rest as ``gated_deltanet_step_fused``. Returns (o (B, T, H D), the
    state after each token (B, T, H, D, D) fp32): what T calls of the one-token kernel give, bit for bit."""
    B, T = proj.shape[:2]
    H, D, K = n_heads, head_dim, conv_weight.shape[-1]
    proj, cache, S = proj.contiguous(), cache.contiguous(), S.contiguous()
    out, trail = _steps_outputs(proj, S, H, D, out_dtype)
    _gdn_steps_kernel[(B, H)](
        proj, cache, conv_weight.reshape(3 * H * D, K).contiguous(), A_log, dt_bias, S, norm_weight, out, trail,
        proj.stride(0), proj.stride(1), cache.stride(0), cache.stride(1),
        H, D, norm_eps, D**-0.5,
        T=T, K=K, BLOCK_D=triton.next_power_of_2(D), NORM_QK=norm_qk, USE_GATE=use_gate,
        num_warps=STEPS_WARPS,
    )  # fmt: skip
    return out, trail


def _steps_outputs(proj, S, n_heads, head_dim, out_dtype):
    B, T = proj.shape[:2]
    out = torch.empty(B, T, n_heads * head_dim, device=proj.device, dtype=out_dtype)
    return out, torch.empty(B, T, *S.shape[1:], device=S.device, dtype=S.dtype)


@gated_deltanet_steps_fused.register_fake
def _(proj, cache, conv_weight, A_log, dt_bias, S, norm_weight, n_heads, head_dim, norm_eps, norm_qk, use_gate,
      out_dtype):  # fmt: skip
    return _steps_outputs(proj, S, n_heads, head_dim, out_dtype)
