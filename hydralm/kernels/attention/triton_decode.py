"""One decode step of sliding-window attention as two Triton kernels (backend HYDRALM_SWA_DECODE=triton).

The PyTorch step (``SlidingWindowAttention.step``) expands the ring's keys and values to every query head
(``repeat_kv``: two copies), builds the mask of the written slots and calls SDPA on one query: at batch 1 on an
H200 that is latency-bound (SDPA alone about 12 us a layer). Here the attention reads the ring where it lies, a
query head h reading key head h // (H / H_kv), and the work of each (row, head) spreads over many programs
(flash-decoding's split, triton_decode_parts.py):

    _window_part_kernel  one program per (row, query head, block of 64 ring slots): the block's partial softmax
                         over its written slots (max, exp-sum, unnormalised output; base 2, fp32)
    _combine_parts       one program per (row, query head): the blocks merged by their log-sum-exps

Slot order does not matter (softmax is order-free), so the ring is never unrolled; a slot j is written once j <=
pos, the current token's position (all slots once the ring has wrapped). The position is read on the device:
a StaticDecoder's counter never reaches the host. Same formulas as the PyTorch step (the test oracle,
tests/test_swa_decode.py), another summation order.
"""

from typing import Tuple, Union

import torch

from hydralm.kernels.attention.triton_decode_parts import LOG2_E, combine_parts, empty_parts
from hydralm.kernels.triton_common import tl, triton

SLOT_BLOCK = 64  # ring slots per part program

if triton is not None:
    from hydralm.kernels.attention.triton_decode_parts import _chunk_softmax

    @triton.jit
    def _window_part_kernel(
        q_ptr, ring_k, ring_v, pos_ptr, m_ptr, denom_ptr, acc_ptr, H, H_KV, W, D, scale_log2,
        BLOCK: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        """The partial softmax of query head (row, h) over ring slots part * BLOCK .. + BLOCK that are written."""
        bh, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
        row, h = bh // H, bh % H
        kv = row * H_KV + h // (H // H_KV)  # (row, key head): the ring's leading index
        d = tl.arange(0, BD)
        dmask = d < D
        q = tl.load(q_ptr + bh * D + d, mask=dmask, other=0.0).to(tl.float32)
        r = tl.arange(0, BLOCK)
        slots = part * BLOCK + r
        written = (slots < W) & (slots <= tl.load(pos_ptr))
        m, denom, acc = _chunk_softmax(q, ring_k, ring_v, kv * W + part * BLOCK, r, written, scale_log2, d, dmask, D)
        out = bh * tl.num_programs(1) + part
        tl.store(m_ptr + out, m)
        tl.store(denom_ptr + out, denom)
        tl.store(acc_ptr + out * D + d, acc, mask=dmask)


@torch.library.custom_op("hydralm::sliding_window_decode", mutates_args=())
def sliding_window_decode_op(
    q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, pos: torch.Tensor
) -> Tuple[torch.Tensor]:
    """q (B, H, D) the token's rotated queries; ring_k / ring_v (B, H_kv, W, D) the last W tokens' rotated keys and
    values, the token's own written (token p in slot p % W); pos a 0-d int64 tensor, the token's position. Returns
    (y,), y (B, H, D) in q's dtype: softmax(q k^T / sqrt(D)) v over the written slots, fp32 inside. A 1-tuple, as
    ``retrieval_decode_step`` returns (inductor keeps a tuple-output op where it stands instead of moving it past
    the state's update)."""
    B, H, D = q.shape
    h_kv, W = ring_k.shape[1], ring_k.shape[2]
    q, ring_k, ring_v = q.contiguous(), ring_k.contiguous(), ring_v.contiguous()
    parts = triton.cdiv(W, SLOT_BLOCK)
    m, denom, acc = empty_parts(B * H, parts, D, q.device)
    _window_part_kernel[(B * H, parts)](
        q, ring_k, ring_v, pos.reshape(1).to(torch.int64), m, denom, acc, H, h_kv, W, D, D**-0.5 * LOG2_E,
        BLOCK=SLOT_BLOCK, BD=triton.next_power_of_2(D),
    )  # fmt: skip
    return (combine_parts(m, denom, acc, torch.empty_like(q)),)


@sliding_window_decode_op.register_fake
def _(q, ring_k, ring_v, pos):
    return (torch.empty_like(q),)


def sliding_window_decode(
    q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor, pos: Union[int, torch.Tensor]
) -> torch.Tensor:
    """The op for a position that is a Python int (eager ``model.step``: copied to the device) or a 0-d device
    tensor (a StaticDecoder's counter: read there only). Returns y (B, H, D)."""
    if not torch.is_tensor(pos):
        pos = torch.tensor(pos, dtype=torch.int64, device=q.device)
    return sliding_window_decode_op(q, ring_k, ring_v, pos)[0]
