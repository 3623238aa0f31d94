"""The decode kernels compiled for the GPUs we target (sm_90: H100 / H200) on the CPU, from Triton source to
machine code. Triton's CPU interpreter, where the other tests run them, checks their arithmetic but not the
compiler's typing: a variable whose type differs between the branches of a runtime `if` runs there and fails
to compile on a GPU. No GPU is needed to compile, only Triton's bundled ptxas. Each case runs in a process of
its own without TRITON_INTERPRET (under it `triton.jit` gives interpreted functions, which do not compile)."""

import os
import subprocess
import sys

import pytest

from hydralm.kernels.triton_common import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile(fn, types: dict, constants: dict, num_warps: int = 4):
    """triton.compile for sm_90 with pointer / scalar types by argument name (others i32) and constexpr values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    constexprs = {(names.index(n),): v for n, v in constants.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _gemv(fold: str):
    from hydralm.kernels.linear.triton_gemv import _gemv_kernel

    types = dict(x="*bf16", w="*bf16", y="*bf16", norm_w="*bf16", res="*bf16", eps="fp32")
    flags = {"NORM": False, "SWIGLU": False, "RESIDUAL": False, **{name: True for name in fold.split("+") if name}}
    return [_compile(_gemv_kernel, types, dict(BLOCK_N=4, BLOCK_K=1024, **flags))]


def _retrieval_decode():
    """At the 160m layer's shapes: 576 held slots (512 pooled chunks of 8 keys, 64 exact of 64), top-8, D 64."""
    from hydralm.kernels.attention import triton_decode_parts as parts
    from hydralm.kernels.retrieval import triton_decode as kernels

    bf16, fp32 = "*bf16", "*fp32"
    rings = dict(buf_k=bf16, buf_v=bf16, bank_k=bf16, bank_v=bf16, pool_k=bf16, pool_v=bf16)
    return [
        _compile(kernels._route_scores_kernel,
                 dict(q_ptr=bf16, summaries=fp32, pool_summaries=fp32, routable="*i8", scores_ptr=fp32),
                 dict(BLOCK=kernels.ROUTE_BLOCK, BD=64)),
        _compile(kernels._attend_part_kernel,
                 dict(q_ptr=bf16, **rings, scores_ptr=fp32, slot_ids="*i64", pos_ptr="*i64", m_ptr=fp32,
                      denom_ptr=fp32, acc_ptr=fp32, scale_log2="fp32"),
                 dict(C=64, CP=8, TOP_K=8, BLOCK_S=1024, BC=64, BCP=8, BD=64)),
        _compile(parts._combine_parts_kernel, dict(m_ptr=fp32, denom_ptr=fp32, acc_ptr=fp32, out_ptr=bf16),
                 dict(PARTS=10, BP=16, BD=64)),
    ]  # fmt: skip


def _swa_decode():
    """At the 160m layer's shapes: a ring of 512 slots (8 blocks of 64), D 64."""
    from hydralm.kernels.attention import triton_decode as kernels
    from hydralm.kernels.attention import triton_decode_parts as parts

    bf16, fp32 = "*bf16", "*fp32"
    return [
        _compile(kernels._window_part_kernel,
                 dict(q_ptr=bf16, ring_k=bf16, ring_v=bf16, pos_ptr="*i64", m_ptr=fp32, denom_ptr=fp32, acc_ptr=fp32,
                      scale_log2="fp32"),
                 dict(BLOCK=kernels.SLOT_BLOCK, BD=64)),
        _compile(parts._combine_parts_kernel, dict(m_ptr=fp32, denom_ptr=fp32, acc_ptr=fp32, out_ptr=bf16),
                 dict(PARTS=512 // kernels.SLOT_BLOCK, BP=8, BD=64)),
    ]  # fmt: skip


def _gdn_decode():
    """The Gated DeltaNet step kernel and its T-token form at the 160m layer's shapes: H 12, D 64, conv width 4,
    bf16 projections, fp32 states, three tokens (a speculative verify of two drafts)."""
    from hydralm.kernels.delta_rule import triton_decode as kernels

    bf16, fp32 = "*bf16", "*fp32"
    common = dict(proj=bf16, cache=bf16, conv_w=bf16, A_log=fp32, dt_bias=fp32, S=fp32, norm_w=bf16, out=bf16,
                  norm_eps="fp32", scale="fp32")  # fmt: skip
    flags = dict(K=4, BLOCK_D=64, NORM_QK=True, USE_GATE=True)
    return [
        _compile(kernels._gdn_step_kernel, dict(common, S_out=fp32, cache_out=bf16), flags),
        _compile(kernels._gdn_steps_kernel, dict(common, S_trail=fp32), dict(flags, T=3), kernels.STEPS_WARPS),
    ]


def _mismatched_branches():
    import triton
    import triton.language as tl

    @triton.jit
    def mismatched(out_ptr, flag, A: tl.constexpr, B: tl.constexpr):
        if flag > 0:
            rows = tl.arange(0, A) < 3
        else:
            rows = tl.arange(0, B) < 3
        tl.store(out_ptr + tl.arange(0, A), rows.to(tl.float32))

    return [_compile(mismatched, dict(out_ptr="*fp32"), dict(A=64, B=8))]


CASES = {
    "gemv": lambda: _gemv(""),
    "gemv+NORM": lambda: _gemv("NORM"),
    "gemv+SWIGLU+RESIDUAL": lambda: _gemv("SWIGLU+RESIDUAL"),
    "gemv+RESIDUAL": lambda: _gemv("RESIDUAL"),
    "retrieval_decode": _retrieval_decode,
    "swa_decode": _swa_decode,
    "gdn_decode": _gdn_decode,
    "mismatched_branches": _mismatched_branches,
}


def _run(case: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", [c for c in CASES if c != "mismatched_branches"])
def test_the_decode_kernels_compile_for_sm90(case):
    result = _run(case)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_a_branch_type_mismatch_fails_to_compile():
    """Sabotage: the mistake the interpreter lets through (a variable of another shape in each branch of a
    runtime `if`, as the retrieval decode kernel once had) is caught here."""
    result = _run("mismatched_branches")
    assert result.returncode != 0 and "Mismatched type" in result.stderr


if __name__ == "__main__":
    kernels = CASES[sys.argv[1]]()
    assert all(kernel.asm["cubin"] for kernel in kernels)
    print("compiled", len(kernels))
