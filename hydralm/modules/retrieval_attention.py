"""Chunk-sparse top-k retrieval attention mixer (routing and kernel in kernels/chunk_retrieval.py).

No positional encoding (NoPE): a chunk summary is the mean of its keys, and rotating keys by position would
make means of distant chunks incomparable; position information comes from the DeltaNet and SWA layers.

Decode state (one dict, chunk ids are global):
  bank_k, bank_v  (B, H_kv, capacity, C, D)  keys / values of the n_chunks completed chunks
  summaries       (B, H_kv, capacity, D)     mean key of each completed chunk (fp32)
  n_chunks        completed chunks; capacity >= n_chunks grows by doubling
  buf_k, buf_v    (B, H_kv, C, D)            the chunk in progress (pos % C tokens filled)
  q_sum           (B, H, D)                  sum of its queries so far (fp32) -> routing of the next chunk
  selected, selected_valid (B, H, top_k)     routing of the chunk in progress
  pos             tokens seen
Appends write into spare bank capacity in place; older state objects only read their own first n_chunks,
so keeping an old state and continuing from it later (rollback) is exact. Branching two live
continuations from one state needs ``clone_state`` (see hydralm/state.py).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.chunk_retrieval import chunk_attention, gather_chunks, route_chunks
from hydralm.kernels.local_attention import repeat_kv
from hydralm.modules.attention import AttentionProjections


class RetrievalAttention(nn.Module):
    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.proj = AttentionProjections(cfg)
        self.chunk_size, self.top_k = cfg.retrieval_chunk_size, cfg.retrieval_top_k

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        B, h_kv, H, D, C = batch_size, self.proj.n_kv_heads, self.proj.n_heads, self.proj.head_dim, self.chunk_size
        return {
            "bank_k": torch.zeros(B, h_kv, 0, C, D, device=device, dtype=dtype),
            "bank_v": torch.zeros(B, h_kv, 0, C, D, device=device, dtype=dtype),
            "summaries": torch.zeros(B, h_kv, 0, D, device=device, dtype=torch.float32),
            "n_chunks": 0,
            "buf_k": torch.zeros(B, h_kv, C, D, device=device, dtype=dtype),
            "buf_v": torch.zeros(B, h_kv, C, D, device=device, dtype=dtype),
            "q_sum": torch.zeros(B, H, D, device=device, dtype=torch.float32),
            "selected": torch.zeros(B, H, self.top_k, device=device, dtype=torch.long),
            "selected_valid": torch.zeros(B, H, self.top_k, device=device, dtype=torch.bool),
            "pos": 0,
        }

    def forward(self, x: torch.Tensor, state: Optional[dict] = None):
        q, k, v = self.proj.split(x)
        y, state = self.attend(q, k, v, state)
        return self.proj.merge(y), state

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[dict] = None):
        """The parallel path on projected heads: q (B, H, N, D), k/v (B, H_kv, N, D) -> (B, H, N, D), state."""
        B, H, N, D = q.shape
        st = state if state is not None else self.init_state(B, q.device, k.dtype)
        if N == 0:
            return q.new_zeros(B, H, 0, D), st
        C, groups = self.chunk_size, self.proj.kv_groups
        n0, filled = st["n_chunks"], st["pos"] % C
        device = q.device
        # Lay the new tokens on the chunk grid that starts at chunk n0: the `filled` buffered tokens of
        # the chunk in progress come first (their queries are placeholders whose outputs are dropped).
        k = torch.cat([st["buf_k"][:, :, :filled].to(k.dtype), k], dim=2)
        v = torch.cat([st["buf_v"][:, :, :filled].to(v.dtype), v], dim=2)
        q = F.pad(q, (0, 0, filled, 0))
        length = filled + N
        M, n_full = -(-length // C), length // C  # local chunks, completed local chunks
        pad = M * C - length
        qc = F.pad(q, (0, 0, 0, pad)).unflatten(2, (M, C))  # (B, H, M, C, D)
        kc = F.pad(k, (0, 0, 0, pad)).unflatten(2, (M, C))  # (B, H_kv, M, C, D)
        vc = F.pad(v, (0, 0, 0, pad)).unflatten(2, (M, C))

        summaries_new = kc[:, :, :n_full].float().mean(-2)
        q_sums = qc.float().sum(-2)
        q_sums = torch.cat([q_sums[:, :, :1] + st["q_sum"][:, :, None], q_sums[:, :, 1:]], dim=2)
        bank_summaries = st["summaries"][:, :, :n0]

        # Routing: local chunk 0 continues the state's chunk in progress; chunk m >= 1 is routed by the
        # mean query of chunk m - 1 over chunks < n0 + m - 1 (global ids).
        selected, valid = st["selected"][:, :, None], st["selected_valid"][:, :, None]
        if M > 1:
            n_eligible = torch.arange(n0, n0 + M - 1, device=device)
            sel, val = route_chunks(q_sums[:, :, : M - 1] / C, [bank_summaries, summaries_new], n_eligible, self.top_k)
            selected, valid = torch.cat([selected, sel], dim=2), torch.cat([valid, val], dim=2)

        selected_k = gather_chunks(kc, selected, offset=n0)
        selected_v = gather_chunks(vc, selected, offset=n0)
        if n0 > 0:
            in_bank = (selected < n0)[..., None, None]
            selected_k = torch.where(in_bank, gather_chunks(st["bank_k"][:, :, :n0], selected), selected_k)
            selected_v = torch.where(in_bank, gather_chunks(st["bank_v"][:, :, :n0], selected), selected_v)
            prev_k = torch.cat([st["bank_k"][:, :, n0 - 1 : n0].to(kc.dtype), kc[:, :, : M - 1]], dim=2)
            prev_v = torch.cat([st["bank_v"][:, :, n0 - 1 : n0].to(vc.dtype), vc[:, :, : M - 1]], dim=2)
        else:
            prev_k, prev_v = F.pad(kc[:, :, : M - 1], (0, 0, 0, 0, 1, 0)), F.pad(vc[:, :, : M - 1], (0, 0, 0, 0, 1, 0))
        prev_valid = torch.arange(n0, n0 + M, device=device) >= 1
        causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
        y = chunk_attention(
            qc, selected_k, selected_v, valid,
            repeat_kv(prev_k, groups), repeat_kv(prev_v, groups), prev_valid,
            repeat_kv(kc, groups), repeat_kv(vc, groups), causal,
        )
        y = y.flatten(2, 3)[:, :, filled:length]

        # New state: completed chunks join the bank; the remainder becomes the chunk in progress.
        remainder = length - n_full * C
        new = {
            "bank_k": _append(st["bank_k"], n0, kc[:, :, :n_full]),
            "bank_v": _append(st["bank_v"], n0, vc[:, :, :n_full]),
            "summaries": _append(st["summaries"], n0, summaries_new),
            "n_chunks": n0 + n_full,
            "pos": st["pos"] + N,
        }
        if remainder:
            new.update(buf_k=kc[:, :, n_full], buf_v=vc[:, :, n_full], q_sum=q_sums[:, :, n_full],
                       selected=selected[:, :, n_full], selected_valid=valid[:, :, n_full])
        else:
            new.update(self._close_chunk(new, q_sums[:, :, n_full - 1], kc))
        return y, new

    def step(self, x_t: torch.Tensor, st: dict):
        """x_t (B, d_model) -> (B, d_model); O(k * C) work per token."""
        C, groups = self.chunk_size, self.proj.kv_groups
        n, filled = st["n_chunks"], st["pos"] % C
        q, k, v = self.proj.split(x_t[:, None])  # (B, H, 1, D), (B, H_kv, 1, D)
        slot = torch.tensor([filled], device=x_t.device)
        buf_k = st["buf_k"].index_copy(2, slot, k.to(st["buf_k"].dtype))
        buf_v = st["buf_v"].index_copy(2, slot, v.to(st["buf_v"].dtype))
        if n > 0:
            bank_k, bank_v = st["bank_k"][:, :, :n], st["bank_v"][:, :, :n]
            selected_k, selected_v = gather_chunks(bank_k, st["selected"]), gather_chunks(bank_v, st["selected"])
            prev_k, prev_v = bank_k[:, :, n - 1], bank_v[:, :, n - 1]
        else:  # nothing completed yet: placeholders, all masked
            selected_k = selected_v = buf_k.new_zeros(*st["selected"].shape, C, buf_k.shape[-1])
            prev_k = prev_v = torch.zeros_like(buf_k)
        own_mask = (torch.arange(C, device=x_t.device) <= filled)[None]
        y = chunk_attention(
            q[:, :, None], selected_k[:, :, None], selected_v[:, :, None], st["selected_valid"][:, :, None],
            repeat_kv(prev_k, groups)[:, :, None], repeat_kv(prev_v, groups)[:, :, None],
            torch.tensor(n > 0, device=x_t.device),
            repeat_kv(buf_k, groups)[:, :, None], repeat_kv(buf_v, groups)[:, :, None], own_mask,
        )
        new = dict(st, buf_k=buf_k, buf_v=buf_v, q_sum=st["q_sum"] + q[:, :, 0].float(), pos=st["pos"] + 1)
        if filled == C - 1:  # the chunk just completed
            new.update(
                bank_k=_append(st["bank_k"], n, buf_k[:, :, None]),
                bank_v=_append(st["bank_v"], n, buf_v[:, :, None]),
                summaries=_append(st["summaries"], n, buf_k[:, :, None].float().mean(-2)),
                n_chunks=n + 1,
            )
            new.update(self._close_chunk(new, new["q_sum"], buf_k))
        return self.proj.merge(y.flatten(2, 3))[:, 0], new

    def _close_chunk(self, st: dict, q_sum: torch.Tensor, like: torch.Tensor) -> dict:
        """Fresh chunk in progress after a completed one: empty buffer, routing from its mean query."""
        n = st["n_chunks"]
        B, H = q_sum.shape[:2]
        selected, valid = route_chunks(
            (q_sum / self.chunk_size)[:, :, None], [st["summaries"][:, :, : n - 1]],
            torch.tensor([n - 1], device=q_sum.device), self.top_k,
        )
        buf_shape = (B, self.proj.n_kv_heads, self.chunk_size, self.proj.head_dim)
        return {
            "buf_k": like.new_zeros(buf_shape), "buf_v": like.new_zeros(buf_shape), "q_sum": torch.zeros_like(q_sum),
            "selected": selected[:, :, 0], "selected_valid": valid[:, :, 0],
        }


def _append(bank: torch.Tensor, n: int, new: torch.Tensor) -> torch.Tensor:
    """Bank with `new` (chunk axis 2) written after its first n entries; capacity doubles when full."""
    count = new.shape[2]
    if count == 0:
        return bank
    if n == 0 and bank.shape[2] == 0:
        return new  # training forward: a view, no copy
    capacity = bank.shape[2]
    grad_tracked = torch.is_grad_enabled() and (bank.requires_grad or new.requires_grad)
    if n + count <= capacity and not grad_tracked:
        bank[:, :, n : n + count] = new.to(bank.dtype)
        return bank
    if grad_tracked:
        return torch.cat([bank[:, :, :n], new.to(bank.dtype)], dim=2)
    grown = bank.new_zeros(*bank.shape[:2], max(n + count, 2 * capacity), *bank.shape[3:])
    grown[:, :, :n] = bank[:, :, :n]
    grown[:, :, n : n + count] = new.to(bank.dtype)
    return grown
