"""The gated delta rule, laid out by form as fla lays out its ops:

    reference.py          delta_rule_step / delta_rule_recurrent: one token at a time (the test oracle)
    chunk.py              delta_rule_chunkwise: the chunkwise WY form in PyTorch (state pass in a loop)
    triton_state_pass.py  the pass over chunks as Triton kernels (backend "triton")
    triton_fused.py       the whole chunkwise form as Triton kernels, forward and backward (backend "fused")

``chunk_gated_delta_rule`` (and ``chunk_gated_delta_rule_packed``, for q, k, v in one tensor) is the one place
that picks among them (and fla's kernel) for a layer's call;
``kernels/backend.py`` reads the user's switches.
"""

from typing import Optional, Tuple

import torch

from hydralm.kernels.backend import deltanet_backend, deltanet_compile
from hydralm.kernels.delta_rule.chunk import compiled_delta_rule_chunkwise, delta_rule_chunkwise
from hydralm.kernels.delta_rule.reference import delta_rule_recurrent, delta_rule_step, l2_normalize

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_packed",
    "delta_rule_chunkwise",
    "delta_rule_recurrent",
    "delta_rule_step",
]


# Opaque to torch.compile: a compiled block (HydraLM.compile_blocks) launches our Triton kernels as they are
# instead of tracing them, and never unrolls the PyTorch loop over chunks (thousands of chunks at 64k tokens).
# The op's own compile switch (HYDRALM_DELTANET_COMPILE) still applies inside.
@torch.compiler.disable
def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    qk_l2norm_eps: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A layer's call, in fla's head-last layout: q, k (B, T, H, d_k); v (B, T, H, d_v); g, beta (B, T, H).

    Returns o (B, T, H, d_v) in v's dtype and the final state (B, H, d_k, d_v) in fp32 (fp64 for fp64 inputs).
    The backend is chosen per call (kernels/backend.py): gradients needed or not, CUDA or CPU.
    qk_l2norm_eps: q and k are raw and get L2-normalised here (``l2_normalize``; inside the fused kernels).
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))
    backend = deltanet_backend(q.is_cuda, needs_grad)
    if backend == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

        if qk_l2norm_eps is not None:
            q, k = l2_normalize(q, qk_l2norm_eps), l2_normalize(k, qk_l2norm_eps)
        # beta in q's dtype, as fla's own layers pass it
        return fla_chunk_gated_delta_rule(
            q, k, v, g, beta.to(q.dtype), initial_state=initial_state, output_final_state=True
        )
    compiled = backend == "triton" and needs_grad and deltanet_compile()
    kernel = compiled_delta_rule_chunkwise() if compiled else delta_rule_chunkwise
    o, state = kernel(
        *(t.transpose(1, 2) for t in (q, k, v, g, beta)),
        initial_state=initial_state,
        chunk_size=chunk_size,
        backend=backend,
        qk_l2norm_eps=qk_l2norm_eps,
    )
    return o.transpose(1, 2), state


@torch.compiler.disable
def chunk_gated_delta_rule_packed(
    qkv: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    qk_l2norm_eps: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``chunk_gated_delta_rule`` on q, k, v packed in one head-last tensor qkv (B, T, 3, H, d), as a Gated DeltaNet
    layer holds them. The fused backend takes the tensor whole (``delta_rule_fused_packed``: o and the gradient
    of qkv written head-last, no copies); the others unpack it."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, g, beta))
    if deltanet_backend(qkv.is_cuda, needs_grad) == "fused":
        from hydralm.kernels.delta_rule.triton_fused import delta_rule_fused_packed

        o, state = delta_rule_fused_packed(
            qkv, g.transpose(1, 2), beta.transpose(1, 2), initial_state, None, chunk_size, qk_l2norm_eps
        )
        return o.transpose(1, 2), state
    q, k, v = qkv.unbind(2)
    return chunk_gated_delta_rule(q, k, v, g, beta, initial_state, chunk_size, qk_l2norm_eps)
