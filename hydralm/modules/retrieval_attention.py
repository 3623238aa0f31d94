"""Chunk-sparse top-k retrieval attention mixer (routing and kernel in kernels/chunk_retrieval.py).

No positional encoding (NoPE): a chunk summary is the mean of its keys, and rotating keys by position would
make means of distant chunks incomparable; position information comes from the DeltaNet and SWA layers.

Decode state (one dict; chunk ids are global):
  bank_k, bank_v  (B, H_kv, capacity, C, D)  keys / values of the n_chunks completed chunks
  summaries       (B, H_kv, capacity, D)     mean key of each completed chunk (fp32)
  n_chunks        completed chunks; capacity >= n_chunks, grows by doubling
  buf_k, buf_v    (B, H_kv, C, D)            the chunk in progress (pos % C tokens filled)
  pos             tokens seen
Appends write into spare bank capacity in place; an older state object only reads its own first
n_chunks, so keeping an old state and continuing from it later (rollback) is exact. Two continuations
from one state that are both still in use need an independent copy of the state.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.chunk_retrieval import gather_chunks, route_tokens, sparse_chunk_attention, union_of_selections
from hydralm.kernels.local_attention import repeat_kv
from hydralm.modules.attention import AttentionProjections

# Largest gathered key block (elements) the parallel path materialises at once; bounds prefill memory.
GATHER_BUDGET = 1 << 24


class RetrievalAttention(nn.Module):
    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.proj = AttentionProjections(cfg)
        self.chunk_size, self.top_k = cfg.retrieval_chunk_size, cfg.retrieval_top_k

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        B, h_kv, D, C = batch_size, self.proj.n_kv_heads, self.proj.head_dim, self.chunk_size
        return {
            "bank_k": torch.zeros(B, h_kv, 0, C, D, device=device, dtype=dtype),
            "bank_v": torch.zeros(B, h_kv, 0, C, D, device=device, dtype=dtype),
            "summaries": torch.zeros(B, h_kv, 0, D, device=device, dtype=torch.promote_types(dtype, torch.float32)),
            "n_chunks": 0,
            "buf_k": torch.zeros(B, h_kv, C, D, device=device, dtype=dtype),
            "buf_v": torch.zeros(B, h_kv, C, D, device=device, dtype=dtype),
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
        C, groups, device = self.chunk_size, self.proj.kv_groups, q.device
        n0, filled = st["n_chunks"], st["pos"] % C
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
        summaries_new = _summarise(kc[:, :, :n_full])
        summary_parts = [st["summaries"][:, :, :n0], summaries_new]

        # Local context of local chunk m: [chunk m-1 | chunk m], the first taken from the bank.
        if n0 > 0:
            prev_k = torch.cat([st["bank_k"][:, :, n0 - 1 : n0].to(kc.dtype), kc[:, :, : M - 1]], dim=2)
            prev_v = torch.cat([st["bank_v"][:, :, n0 - 1 : n0].to(vc.dtype), vc[:, :, : M - 1]], dim=2)
        else:
            prev_k = F.pad(kc[:, :, : M - 1], (0, 0, 0, 0, 1, 0))
            prev_v = F.pad(vc[:, :, : M - 1], (0, 0, 0, 0, 1, 0))
        local_k = repeat_kv(torch.cat([prev_k, kc], dim=3), groups)  # (B, H, M, 2C, D)
        local_v = repeat_kv(torch.cat([prev_v, vc], dim=3), groups)
        chunk_ids = n0 + torch.arange(M, device=device)
        causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
        prev_ok = (chunk_ids >= 1)[:, None, None].expand(M, C, C)
        local_mask = torch.cat([prev_ok, causal.expand(M, C, C)], dim=-1)  # (M, C, 2C)

        n_total = n0 + n_full
        per_chunk = max(1, B * H * min(C * self.top_k, max(n_total, 1)) * C * D)
        block = max(1, GATHER_BUDGET // per_chunk)
        outputs = []
        for a in range(0, M, block):
            b = min(M, a + block)
            q_blk = qc[:, :, a:b]
            n_eligible = (chunk_ids[a:b] - 1).clamp(min=0)[:, None]  # token of chunk i may pick j < i - 1
            selected, valid = route_tokens(q_blk, summary_parts, n_eligible, self.top_k)  # (B, H, m, C, k)
            union, union_valid, reads = union_of_selections(selected, valid, max(n_total, 1))
            union_k, union_v = gather_chunks(kc, union, offset=n0), gather_chunks(vc, union, offset=n0)
            if n0 > 0:
                in_bank = (union < n0)[..., None, None]
                union_k = torch.where(in_bank, gather_chunks(st["bank_k"][:, :, :n0], union).to(kc.dtype), union_k)
                union_v = torch.where(in_bank, gather_chunks(st["bank_v"][:, :, :n0], union).to(vc.dtype), union_v)
            outputs.append(sparse_chunk_attention(q_blk, union_k, union_v, reads,
                                                  local_k[:, :, a:b], local_v[:, :, a:b], local_mask[a:b]))
        y = torch.cat(outputs, dim=2).flatten(2, 3)[:, :, filled:length]

        # New state: completed chunks join the bank; the remainder becomes the chunk in progress.
        remainder = length - n_full * C
        new = {
            "bank_k": _append(st["bank_k"], n0, kc[:, :, :n_full]),
            "bank_v": _append(st["bank_v"], n0, vc[:, :, :n_full]),
            "summaries": _append(st["summaries"], n0, summaries_new),
            "n_chunks": n0 + n_full,
            "buf_k": kc[:, :, n_full] if remainder else torch.zeros_like(st["buf_k"]),
            "buf_v": vc[:, :, n_full] if remainder else torch.zeros_like(st["buf_v"]),
            "pos": st["pos"] + N,
        }
        return y, new

    def step(self, x_t: torch.Tensor, st: dict):
        """x_t (B, d_model) -> (B, d_model); O(n_chunks * D) routing + O(k * C * D) attention per token."""
        C, groups = self.chunk_size, self.proj.kv_groups
        n, filled = st["n_chunks"], st["pos"] % C
        q, k, v = self.proj.split(x_t[:, None])  # (B, H, 1, D), (B, H_kv, 1, D)
        slot = torch.tensor([filled], device=x_t.device)
        buf_k = st["buf_k"].index_copy(2, slot, k.to(st["buf_k"].dtype))
        buf_v = st["buf_v"].index_copy(2, slot, v.to(st["buf_v"].dtype))
        bank_k, bank_v = st["bank_k"][:, :, :n], st["bank_v"][:, :, :n]
        eligible = torch.tensor(max(n - 1, 0), device=x_t.device)  # chunks before the previous one
        selected, valid = route_tokens(q, [st["summaries"][:, :, :n]], eligible, self.top_k)  # (B, H, 1, k)
        if n > 0:
            selected_k, selected_v = gather_chunks(bank_k, selected), gather_chunks(bank_v, selected)
            prev_k, prev_v = bank_k[:, :, n - 1], bank_v[:, :, n - 1]
        else:  # nothing completed yet: placeholders, all masked
            selected_k = selected_v = buf_k.new_zeros(*selected.shape, C, buf_k.shape[-1])
            prev_k, prev_v = torch.zeros_like(buf_k), torch.zeros_like(buf_v)
        local_k = repeat_kv(torch.cat([prev_k, buf_k], dim=2), groups)  # (B, H, 2C, D)
        local_v = repeat_kv(torch.cat([prev_v, buf_v], dim=2), groups)
        slots = torch.arange(C, device=x_t.device)
        local_mask = torch.cat([torch.full((C,), n > 0, device=x_t.device), slots <= filled])[None]
        y = sparse_chunk_attention(q, selected_k[:, :, 0], selected_v[:, :, 0], valid, local_k, local_v, local_mask)
        new = dict(st, buf_k=buf_k, buf_v=buf_v, pos=st["pos"] + 1)
        if filled == C - 1:  # the chunk just completed: it joins the bank
            new.update(
                bank_k=_append(st["bank_k"], n, buf_k[:, :, None]),
                bank_v=_append(st["bank_v"], n, buf_v[:, :, None]),
                summaries=_append(st["summaries"], n, _summarise(buf_k[:, :, None])),
                n_chunks=n + 1,
                buf_k=torch.zeros_like(buf_k),
                buf_v=torch.zeros_like(buf_v),
            )
        return self.proj.merge(y)[:, 0], new


def _summarise(chunks: torch.Tensor) -> torch.Tensor:
    """Chunk summaries: the mean key, in fp32 at least. (B, H_kv, n, C, D) -> (B, H_kv, n, D)."""
    return chunks.to(torch.promote_types(chunks.dtype, torch.float32)).mean(-2)


def _append(bank: torch.Tensor, n: int, new: torch.Tensor) -> torch.Tensor:
    """Bank with `new` (chunk axis 2) written after its first n entries; capacity doubles when full."""
    count = new.shape[2]
    if count == 0:
        return bank
    if n == 0 and bank.shape[2] == 0:
        return new  # e.g. a training forward: a view, no copy
    capacity = bank.shape[2]
    grad_tracked = torch.is_grad_enabled() and (bank.requires_grad or new.requires_grad)
    if grad_tracked:
        return torch.cat([bank[:, :, :n], new.to(bank.dtype)], dim=2)
    if n + count <= capacity:
        bank[:, :, n : n + count] = new.to(bank.dtype)
        return bank
    grown = bank.new_zeros(*bank.shape[:2], max(n + count, 2 * capacity), *bank.shape[3:])
    grown[:, :, :n] = bank[:, :, :n]
    grown[:, :, n : n + count] = new.to(bank.dtype)
    return grown
