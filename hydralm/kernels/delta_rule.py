"""Gated delta rule: the recurrence behind Gated DeltaNet, in three interchangeable forms.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        S_t: (d_k, d_v)
    o_t = scale * S_t^T q_t

* ``delta_rule_step``       — one token, O(1) in sequence length (decoding).
* ``delta_rule_recurrent``  — the readable reference: ``delta_rule_step`` in a loop.
* ``delta_rule_chunkwise``  — the training form: the WY / UT transform turns each chunk of C tokens into
  matrix products, leaving one small sequential pass over chunks (see docs/architecture.md).

Layout: q, k (B, H, T, d_k); v (B, H, T, d_v); g, beta (B, H, T); g is the log-decay (g <= 0).
The state is kept in fp32 (fp64 if the inputs are fp64) whatever the input dtype.
"""

import functools
from typing import Optional, Tuple

import torch

from hydralm.kernels.delta_rule_fused import delta_rule_fused
from hydralm.kernels.delta_rule_triton import state_pass_torch, state_pass_triton


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token. q, k (B, H, d_k); v (B, H, d_v); g, beta (B, H); state (B, H, d_k, d_v)."""
    dtype = state.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    decay = g.exp()[..., None, None]
    b = beta[..., None, None]
    kS = torch.einsum("bhk,bhkv->bhv", k, state)  # k^T S_{t-1}
    # (I - b k k^T) S + b k v^T  ==  S + b k (v - k^T S)^T
    state = decay * (state - b * k[..., :, None] * kS[..., None, :]) + b * k[..., :, None] * v[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return o, state


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: token by token. Returns o (B, H, T, d_v) in v's dtype and the final state."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    state = initial_state
    if state is None:
        state = torch.zeros(B, H, dk, dv, dtype=_compute_dtype(v), device=v.device)
    state = state.to(_compute_dtype(state))
    outputs = []
    for t in range(T):
        o_t, state = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], state, scale)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=2) if outputs else v.new_zeros(B, H, 0, dv)
    return o.to(v.dtype), state


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
    kernels of kernels/delta_rule_triton.py; the outputs of all chunks are then computed at once.
    backend="fused" runs all of it, forward and backward, in the Triton kernels of kernels/delta_rule_fused.py.
    Padding tokens (to a multiple of C) use g = 0, beta = 0, k = 0: they leave the state untouched.
    """
    if backend == "fused":
        return delta_rule_fused(q, k, v, g, beta, initial_state, scale, chunk_size)
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    dtype, out_dtype = _compute_dtype(v), v.dtype
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
    state_pass = state_pass_triton if backend == "triton" else state_pass_torch
    states, delta, state = state_pass(U, W, k_to_end, chunk_decay, initial_state)
    # With every chunk's entering state known, the outputs of all chunks are two batched matmuls.
    o = (q_decayed @ states + intra @ delta).reshape(B, H, n * C, dv)[:, :, :T]
    return o.to(out_dtype), state


@functools.lru_cache(maxsize=1)
def compiled_delta_rule_chunkwise():
    """delta_rule_chunkwise under torch.compile (HYDRALM_DELTANET_COMPILE=1): one compile per shape."""
    return torch.compile(delta_rule_chunkwise, dynamic=False)
