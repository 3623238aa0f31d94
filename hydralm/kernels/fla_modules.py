"""fla-core's Triton kernels for the elementwise parts of a Gated DeltaNet block (HYDRALM_GDN_MODULES=fla).

Each wrapper takes our modules' own parameters, so the state dict is the same with and without fla, and is
opaque to torch.compile (fla's autograd Functions launch Triton kernels behind device guards). The PyTorch
forms they replace: ShortConv.forward (modules/short_conv.py), F.normalize (modules/gated_deltanet.py) and
GatedRMSNorm (modules/rmsnorm.py); `python -m benchmarks.gpu_check gdn_block` compares the two.

fla's L2 norm divides by sqrt(|x|^2 + eps) where F.normalize divides by max(|x|, eps): the same to ~1e-6
relative for rows of norm ~1 (eps 1e-6).
"""

import torch


@torch.compiler.disable
def fla_short_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv(x)) from zeros before the first token: x (B, N, C), weight (C, 1, K)."""
    from fla.modules.convolution import causal_conv1d

    out = causal_conv1d(x=x, weight=weight[:, 0], activation="silu")
    return out[0] if isinstance(out, tuple) else out


@torch.compiler.disable
def fla_l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / |x| over the last dimension, in x's dtype."""
    from fla.modules.l2norm import l2norm

    return l2norm(x, eps=eps)


@torch.compiler.disable
def fla_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight * silu(gate) over the last dimension, computed in fp32, returned in x's dtype."""
    from fla.modules.fused_norm_gate import rms_norm_gated

    return rms_norm_gated(x=x, g=gate, weight=weight, bias=None, activation="swish", eps=eps)
