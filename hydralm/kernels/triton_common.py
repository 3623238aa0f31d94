"""What every Triton kernel of the package shares: the optional import, the dot precision and the `dot` helper.

Triton is optional: without it (or off CUDA, unless ``TRITON_INTERPRET=1`` runs the kernels in Triton's CPU
interpreter, as the tests do) every op falls back to its PyTorch path.
"""

import os
from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths need none of this
    triton = None
    tl = None


def triton_available() -> bool:
    # a plain function, not cached: compiled decode steps call it, and dynamo warns at cached functions
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def eager_training_call(x: torch.Tensor) -> bool:
    """A call our elementwise training kernels (norm, SwiGLU, rotary) take: gradients on, a non-empty tensor that
    is not fp64, and eager execution (under torch.compile the PyTorch form is what inductor fuses)."""
    return torch.is_grad_enabled() and x.dtype != torch.float64 and x.numel() > 0 and not torch.compiler.is_compiling()


def dot_precision(dtype: Optional[torch.dtype] = None) -> str:
    """tl.dot's precision for fp32 tiles. For fp32 inputs (or dtype None) honour
    ``torch.get_float32_matmul_precision()``: "highest" -> IEEE fp32 dots, else TF32. For 16-bit inputs TF32
    (10 mantissa bits, more than the inputs carry). IEEE fp32 dots run on the CUDA cores: under torch's default
    "highest", a bf16 HydraLM-160m's streaming prefill spent 1.70 ms per layer in the fused delta rule's prep
    kernel for 8192 tokens (H200, fce221b), where training (TF32) spends 0.78 ms on 65536."""
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        return "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# The precisions `dot` takes beyond tl.dot's own ("ieee", "tf32", "tf32x3"): both operands rounded to 16 bits.
SIXTEEN_BIT_DOTS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
dot = None  # without Triton

if triton is not None:

    @triton.jit
    def dot(a, b, PRECISION: tl.constexpr):
        """a @ b of fp32 tiles, accumulated in fp32. PRECISION "bf16" / "fp16" rounds both operands to that type
        first, as fla's kernels do with 16-bit inputs (tensor-core dots at twice TF32's rate on half the operand
        registers); otherwise it is tl.dot's input_precision ("ieee", "tf32", "tf32x3")."""
        if PRECISION == "bf16":
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        elif PRECISION == "fp16":
            return tl.dot(a.to(tl.float16), b.to(tl.float16))
        else:
            return tl.dot(a, b, input_precision=PRECISION)


def tile_sizes(C: int, K: int) -> Tuple[int, int]:
    """Tile sizes: powers of two >= 16 (tl.dot's minimum); rows/columns past C, K are masked to zero."""
    return max(16, triton.next_power_of_2(C)), max(16, triton.next_power_of_2(K))
