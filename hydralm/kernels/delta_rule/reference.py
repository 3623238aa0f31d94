"""The readable reference of the gated delta rule: one token at a time.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        S_t: (d_k, d_v)
    o_t = scale * S_t^T q_t

* ``delta_rule_step``       — one token, O(1) in sequence length (decoding).
* ``delta_rule_recurrent``  — ``delta_rule_step`` in a loop: the oracle every faster form is tested against.

Layout: q, k (B, H, T, d_k); v (B, H, T, d_v); g, beta (B, H, T); g is the log-decay (g <= 0).
The state is kept in fp32 (fp64 if the inputs are fp64) whatever the input dtype.
"""

from typing import Optional, Tuple

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def l2_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, in fp32 at least, back in x's dtype (fla's l2norm)."""
    xf = x.to(compute_dtype(x))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


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
        state = torch.zeros(B, H, dk, dv, dtype=compute_dtype(v), device=v.device)
    state = state.to(compute_dtype(state))
    outputs = []
    for t in range(T):
        o_t, state = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], state, scale)
        outputs.append(o_t)
    o = torch.stack(outputs, dim=2) if outputs else v.new_zeros(B, H, 0, dv)
    return o.to(v.dtype), state
