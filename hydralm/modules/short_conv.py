"""Depthwise causal 1-D convolution with a streaming cache (the "short conv" of DeltaNet layers)."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.kernels.fla_modules import fla_short_conv
from hydralm.kernels.triton_common import triton_available
from hydralm.modules.mixer import Counter
from hydralm.modules.recompute import autocast_as, autocast_state


class ShortConv(nn.Module):
    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv1d's default init

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None, kernel: str = "torch"):
        """x: (B, N, C); cache: the previous kernel_size - 1 inputs (B, kernel_size - 1, C) or None.

        Returns (silu(conv(x)), new cache). Zeros stand in for inputs before the stream starts. ``kernel`` (what
        HYDRALM_SHORT_CONV picks: kernels/backend.py) runs a call without a cache through fla's causal_conv1d
        ("fla", CUDA; kernels/fla_modules.py) or our Triton kernels ("triton"; kernels/conv/, which also take a
        cache when no gradient is wanted: chunked prefill, streaming); "torch" and fp64 take the PyTorch form.
        """
        B, N, C = x.shape
        K = self.kernel_size
        carried = cache
        if x.dtype == torch.float64 or (cache is not None and (kernel != "triton" or torch.is_grad_enabled())):
            kernel = "torch"
        if cache is None:
            cache = x.new_zeros(B, K - 1, C)
        # the last K - 1 inputs: a view of x would keep the whole chunk alive in the decode state
        recent = torch.cat([cache.to(x.dtype), x[:, max(0, N - (K - 1)) :]], dim=1)
        new_cache = recent[:, recent.shape[1] - (K - 1) :].clone()  # owns its storage, as every state tensor
        if kernel == "fla":
            return fla_short_conv(x, self.weight), new_cache
        if kernel == "triton" and triton_available():
            return _triton_short_conv(x, self.weight, carried), new_cache
        if torch.is_grad_enabled():  # backward recomputes the padded input and the conv (_ConvSiLU)
            return _ConvSiLU.apply(x, cache, self.weight), new_cache
        return _conv_silu(torch.cat([cache.to(x.dtype), x], dim=1), self.weight), new_cache

    def step(self, x_t: torch.Tensor, cache: torch.Tensor):
        """One token: x_t (B, C) -> (silu(conv), new cache); a dot product over the window."""
        full = torch.cat([cache.to(x_t.dtype), x_t[:, None]], dim=1)  # (B, K, C)
        y = torch.einsum("bkc,ck->bc", full, self.weight[:, 0].to(x_t.dtype))
        return F.silu(y), full[:, 1:]

    def step_many(self, x: torch.Tensor, cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """T tokens: x (B, T, C) -> (silu(conv) (B, T, C), the inputs seen (B, K - 1 + T, C), which hold the cache
        after any prefix: ``cache_after``). Each output is ``step``'s dot product over its window."""
        full = torch.cat([cache.to(x.dtype), x], dim=1)
        windows = full.unfold(1, self.kernel_size, 1)  # (B, T, C, K): window t is full[:, t : t + K]
        y = torch.einsum("btck,ck->btc", windows, self.weight[:, 0].to(x.dtype))
        return F.silu(y), full

    def cache_after(self, full: torch.Tensor, kept: Counter) -> torch.Tensor:
        """The cache after the first `kept` tokens of a ``step_many`` call, from its ``full`` inputs."""
        if torch.is_tensor(kept):
            return full.index_select(1, kept + torch.arange(self.kernel_size - 1, device=full.device))
        return full[:, kept : kept + self.kernel_size - 1].clone()  # a copy: the cache holds no view of `full`


@torch.compiler.disable  # an autograd Function launching Triton kernels: opaque to torch.compile, as fla's
def _triton_short_conv(x: torch.Tensor, weight: torch.Tensor, cache: Optional[torch.Tensor]) -> torch.Tensor:
    """From zeros with autograd, or (no gradients wanted) after a carried cache."""
    from hydralm.kernels.conv.triton_short_conv import short_conv_forward, short_conv_triton

    return short_conv_triton(x, weight) if cache is None else short_conv_forward(x, weight, cache)


def _conv_silu(full: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(depthwise causal conv) over full = [cache | x] (B, K - 1 + N, C) -> (B, N, C)."""
    y = F.conv1d(full.transpose(1, 2), weight.to(full.dtype), groups=full.shape[-1]).transpose(1, 2)
    return F.silu(y)


class _ConvSiLU(torch.autograd.Function):
    """silu(conv([cache | x])) keeping only x, cache and the weight for backward: the padded, transposed input
    and the conv's output (2 x C values per token, what autograd would store) are recomputed there. Backward
    runs under forward's autocast state."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cache: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.autocast = autocast_state(x)
        ctx.save_for_backward(x, cache, weight)
        return _conv_silu(torch.cat([cache.to(x.dtype), x], dim=1), weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(needed) for t, needed in zip(saved, ctx.needs_input_grad)]
        x, cache, weight = inputs
        with torch.enable_grad(), autocast_as(ctx.autocast):
            out = _conv_silu(torch.cat([cache.to(x.dtype), x], dim=1), weight)
        wanted = [t for t, needed in zip(inputs, ctx.needs_input_grad) if needed]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return tuple(next(grads) if needed else None for needed in ctx.needs_input_grad)
