"""Flash-decoding's split: a part's partial softmax, and the merge of parts by log-sum-exp.

A decode step's attention for one (row, query head) is spread over many programs, each taking a part of the keys:
``_chunk_softmax`` gives a part's (max, exp-sum, unnormalised output) in base 2, fp32, and ``_combine_parts_kernel``
(launched by ``combine_parts``) merges the parts of each (row, head) into the softmax over all their keys. Shared
by the retrieval step (kernels/retrieval/triton_decode.py) and the sliding-window step (triton_decode.py here).
"""

from typing import Tuple

import torch

from hydralm.kernels.triton_common import tl, triton

LOG2_E = 1.4426950408889634  # scores are scaled by it: the kernels take exp2, not exp

if triton is not None:

    @triton.jit
    def _chunk_softmax(q, keys, values, first, r, rows_ok, scale_log2, d, dmask, D):
        """(max, exp-sum, unnormalised output) of q's softmax over rows first + r of keys / values, (rows, D)
        row-major, base 2 (rows_ok: which rows count; none: -inf, 0, zeros)."""
        k_ptrs = keys + (first + r)[:, None] * D + d[None, :]
        v_ptrs = values + (first + r)[:, None] * D + d[None, :]
        k = tl.load(k_ptrs, mask=rows_ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.where(rows_ok, tl.sum(k * q[None, :], 1) * scale_log2, float("-inf"))
        m = tl.max(s, 0)
        p = tl.exp2(s - tl.where(m == float("-inf"), 0.0, m))  # no key: every p is 0, nothing NaN
        v = tl.load(v_ptrs, mask=rows_ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        return m, tl.sum(p, 0), tl.sum(p[:, None] * v, 0)

    @triton.jit
    def _combine_parts_kernel(
        m_ptr, denom_ptr, acc_ptr, out_ptr, D, PARTS: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr
    ):
        """y = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) denom_j over the parts, M their max (the callers make
        sure some part holds a key, so M is finite)."""
        bh = tl.program_id(0).to(tl.int64)
        parts, d = tl.arange(0, BP), tl.arange(0, BD)
        ok = parts < PARTS
        m = tl.load(m_ptr + bh * PARTS + parts, mask=ok, other=float("-inf"))
        denom = tl.load(denom_ptr + bh * PARTS + parts, mask=ok, other=0.0)
        acc = tl.load(
            acc_ptr + (bh * PARTS + parts)[:, None] * D + d[None, :], mask=ok[:, None] & (d < D)[None, :], other=0.0
        )
        w = tl.exp2(m - tl.max(m, 0))  # an empty part: 2^-inf = 0
        y = tl.sum(w[:, None] * acc, 0) / tl.sum(w * denom, 0)
        tl.store(out_ptr + bh * D + d, y.to(out_ptr.dtype.element_ty), mask=d < D)


def empty_parts(rows: int, parts: int, D: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Room for the partials of `parts` parts per (row, head): max and exp-sum (rows, parts), output (rows, parts,
    D), fp32."""
    m = torch.empty(rows, parts, device=device, dtype=torch.float32)
    return m, torch.empty_like(m), torch.empty(rows, parts, D, device=device, dtype=torch.float32)


def combine_parts(m: torch.Tensor, denom: torch.Tensor, acc: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (contiguous, rows x D in its dtype) = each (row, head)'s parts merged; returns out."""
    rows, parts, D = acc.shape
    _combine_parts_kernel[(rows,)](
        m, denom, acc, out, D, PARTS=parts, BP=triton.next_power_of_2(parts), BD=triton.next_power_of_2(D)
    )
    return out
