"""The chunkwise (WY / UT-transform) form of the gated delta rule in PyTorch: the training form.

Each chunk of C tokens becomes matrix products; what is left is one small sequential pass over chunks
(``state_pass_torch`` here, or the Triton kernels of triton_state_pass.py). Same layout and result as
reference.py, up to float rounding; docs/architecture.md derives it.
"""

import functools
from typing import Optional, Tuple

import torch

from hydralm.kernels.delta_rule.reference import compute_dtype, l2_normalize


def state_pass_torch(U, W, Kd, a, S0: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference. U (B, H, n, C, d_v); W, Kd (B, H, n, C, d_k); a (B, H, n); S0 (B, H, d_k, d_v) or None (zeros).

    Returns H (B, H, n, d_k, d_v) the state entering each chunk, delta (B, H, n, C, d_v), the final state.
    """
    if S0 is None:
        S0 = U.new_zeros(*W.shape[:2], W.shape[-1], U.shape[-1])
    states, deltas, state = [], [], S0
    # unbind once: indexing [:, :, c] inside the loop would make every chunk's backward write a full-size
    # zero gradient (quadratic in the number of chunks); unbind's backward stacks the pieces once.
    for U_c, W_c, Kd_c, a_c in zip(U.unbind(2), W.unbind(2), Kd.unbind(2), a.unbind(2)):
        states.append(state)
        delta = U_c - W_c @ state
        deltas.append(delta)
        state = a_c[..., None, None] * state + Kd_c.transpose(-1, -2) @ delta
    return torch.stack(states, 2), torch.stack(deltas, 2), state


def delta_rule_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    chunk_size: int = 64,
    backend: str = "torch",
    qk_l2norm_eps: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise (WY) form; equal to ``delta_rule_recurrent`` up to float rounding.

    Inside a chunk, with Gamma_t = exp(sum_{s<=t} g_s) and S_0 the state entering the chunk, write
    S_t = Gamma_t S_0 + sum_{i<=t} (Gamma_t / Gamma_i) k_i delta_i^T. The delta rule gives
    (I + A) delta = beta v - diag(beta Gamma) K S_0 with A[t, i] = beta_t (Gamma_t / Gamma_i) k_t.k_i (i < t),
    so delta = U - W S_0 with U = (I + A)^-1 (beta v) and W = (I + A)^-1 (beta Gamma k): one unit lower
    triangular solve per chunk, done for all chunks at once. Then per chunk, in order:
        O   = (Gamma q) S_0 + (q k^T * D) delta            (D[t, i] = Gamma_t / Gamma_i, i <= t)
        S_C = Gamma_C S_0 + (k * Gamma_C / Gamma)^T delta
    The pass over chunks is ``state_pass_torch`` (a PyTorch loop) or, with backend="triton", the Triton
    kernels of triton_state_pass.py; the outputs of all chunks are then computed at once.
    backend="fused" runs all of it, forward and backward, in the Triton kernels of triton_fused.py.
    Padding tokens (to a multiple of C) use g = 0, beta = 0, k = 0: they leave the state untouched.
    qk_l2norm_eps: q and k arrive raw and are L2-normalised first (``l2_normalize``; backend="fused" does it
    inside its kernels).
    """
    if backend == "fused":
        from hydralm.kernels.delta_rule.triton_fused import delta_rule_fused

        return delta_rule_fused(q, k, v, g, beta, initial_state, scale, chunk_size, qk_l2norm_eps)
    if qk_l2norm_eps is not None:
        q, k = l2_normalize(q, qk_l2norm_eps), l2_normalize(k, qk_l2norm_eps)
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    dtype, out_dtype = compute_dtype(v), v.dtype
    scale = dk**-0.5 if scale is None else scale
    C = chunk_size
    pad = (-T) % C
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (torch.nn.functional.pad(t, (0, pad)) for t in (g, beta))
    n = (T + pad) // C
    q, k, v = (t.reshape(B, H, n, C, -1) for t in (q, k, v))
    g, beta = g.reshape(B, H, n, C), beta.reshape(B, H, n, C)

    gamma = g.cumsum(-1)  # log Gamma_t inside each chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp of masked differences: entries above the diagonal become exp(-inf) = 0, never inf * 0.
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    k_beta = k * beta[..., None]
    A = (k_beta @ k.transpose(-1, -2) * decay).tril(-1)
    # solve_triangular with unitriangular=True reads the diagonal as ones: it solves (I + A) X = B.
    U = torch.linalg.solve_triangular(A, v * beta[..., None], upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(A, k_beta * gamma.exp()[..., None], upper=False, unitriangular=True)

    q_decayed = q * (scale * gamma.exp())[..., None]
    intra = (q @ k.transpose(-1, -2)) * decay * scale
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]
    chunk_decay = gamma[..., -1].exp()  # (B, H, n)

    if initial_state is not None:
        initial_state = initial_state.to(dtype)
    if backend == "triton":
        from hydralm.kernels.delta_rule.triton_state_pass import state_pass_triton as state_pass
    else:
        state_pass = state_pass_torch
    states, delta, state = state_pass(U, W, k_to_end, chunk_decay, initial_state)
    # With every chunk's entering state known, the outputs of all chunks are two batched matmuls.
    o = (q_decayed @ states + intra @ delta).reshape(B, H, n * C, dv)[:, :, :T]
    return o.to(out_dtype), state


@functools.lru_cache(maxsize=1)
def compiled_delta_rule_chunkwise():
    """delta_rule_chunkwise under torch.compile (HYDRALM_DELTANET_COMPILE=1): one compile per shape."""
    return torch.compile(delta_rule_chunkwise, dynamic=False)
