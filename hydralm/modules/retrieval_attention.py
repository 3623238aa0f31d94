"""Chunk-sparse top-k retrieval attention mixer (routing and kernel in kernels/retrieval/).

No positional encoding (NoPE): a chunk summary is the mean of its keys, and rotating keys by position would
make means of distant chunks incomparable; position information comes from the DeltaNet and SWA layers.

Decode state (one dict):
  bank_k, bank_v  (B, H_kv, capacity, C, D)  keys / values of the n_chunks newest completed chunks
  summaries       (B, H_kv, capacity, D)     mean key of each of them (fp32)
  n_chunks        completed chunks in the bank; capacity >= n_chunks grows by doubling
  buf_k, buf_v    (B, H_kv, C, D)            the chunk in progress (pos % C tokens filled)
  pos             tokens seen
With ``HydraConfig.memory`` (a CompressiveMemory per layer) the bank keeps only the chunks of the last
``exact_window`` tokens; older chunks are compressed to C / compress_every slots each and move to
  pool_k, pool_v  (B, H_kv, P, C / compress_every, D), pool_summaries (B, H_kv, P, D), n_pool
(P = pool_size * compress_every / C chunks); when the pool is full the oldest compressed chunks are
evicted and counted in ``evicted``. Compressed chunks keep their exact routing summary, so tokens still
route to them and read their compressed slots; evicted chunks are gone. State bytes are then constant.

Bank appends write into spare capacity in place; an older state object only reads its own first
n_chunks, so keeping an old state and continuing from it later (rollback) is exact. Two continuations
from one state that are both still in use need an independent copy (hydralm.state.clone_state).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig
from hydralm.kernels.attention.local import repeat_kv
from hydralm.kernels.backend import retrieval_backend
from hydralm.kernels.retrieval.gather import gather_chunks, sparse_chunk_attention, union_of_selections
from hydralm.kernels.retrieval.routing import route_tokens
from hydralm.modules.attention import AttentionProjections
from hydralm.modules.compressive_memory import CompressiveMemory
from hydralm.modules.routing_log import routing_entry
from hydralm.modules.routing_loss import answer_routing_loss

# Largest gathered key block (elements) the parallel path materialises at once; bounds prefill memory.
# Each block also costs one host sync and ~60 kernel launches: on a GPU, whose memory is large and whose
# launches dominate small blocks, blocks are 16x larger.
GATHER_BUDGET = {"cpu": 1 << 24, "cuda": 1 << 28}


class RetrievalAttention(nn.Module):
    def __init__(self, cfg: HydraConfig):
        super().__init__()
        self.proj = AttentionProjections(cfg)
        self.chunk_size, self.top_k = cfg.retrieval_chunk_size, cfg.retrieval_top_k
        self.memory = None
        self.memory_loss: Optional[torch.Tensor] = None  # set by a training forward when memory is on
        # Opt-in, read-only: a list (modules/routing_log.py) gets one entry per call with the chunks it picked.
        self.routing_log: Optional[list] = None
        # HydraConfig.retrieval_routing_loss > 0: the trainer sets routing_targets (query and answer positions of
        # the batch) and a training forward leaves the answer-chunk routing loss in routing_loss.
        self.routing_loss_weight = cfg.retrieval_routing_loss
        self.routing_targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.routing_loss: Optional[torch.Tensor] = None
        if cfg.memory is not None:
            m = cfg.memory
            self.memory = CompressiveMemory(
                self.proj.n_kv_heads, self.proj.head_dim, m["exact_window"], m["compress_every"], m["pool_size"]
            )
            self.exact_chunks = m["exact_window"] // self.chunk_size
            self.slots_per_compressed = self.chunk_size // m["compress_every"]
            self.pool_chunks = m["pool_size"] // self.slots_per_compressed

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        B, h_kv, D, C = batch_size, self.proj.n_kv_heads, self.proj.head_dim, self.chunk_size
        summary_dtype = torch.promote_types(dtype, torch.float32)
        capacity = self.exact_chunks + 1 if self.memory is not None else 0
        state = {
            "bank_k": torch.zeros(B, h_kv, capacity, C, D, device=device, dtype=dtype),
            "bank_v": torch.zeros(B, h_kv, capacity, C, D, device=device, dtype=dtype),
            "summaries": torch.zeros(B, h_kv, capacity, D, device=device, dtype=summary_dtype),
            "n_chunks": 0,
            "buf_k": torch.zeros(B, h_kv, C, D, device=device, dtype=dtype),
            "buf_v": torch.zeros(B, h_kv, C, D, device=device, dtype=dtype),
            "pos": 0,
        }
        if self.memory is not None:
            P, Cr = self.pool_chunks, self.slots_per_compressed
            state.update(
                pool_k=torch.zeros(B, h_kv, P, Cr, D, device=device, dtype=dtype),
                pool_v=torch.zeros(B, h_kv, P, Cr, D, device=device, dtype=dtype),
                pool_summaries=torch.zeros(B, h_kv, P, D, device=device, dtype=summary_dtype),
                n_pool=0,
                compressed=0,
                evicted=0,
            )
        return state

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
        n0, filled, n_pool = st["n_chunks"], st["pos"] % C, st.get("n_pool", 0)
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
        # Retrievable chunks, oldest first: compressed pool, exact bank, completed local chunks.
        summary_parts = [st["summaries"][:, :, :n0], summaries_new]
        if n_pool:
            summary_parts.insert(0, st["pool_summaries"][:, :, :n_pool])
        exact_sources = [(st["bank_k"][:, :, :n0], st["bank_v"][:, :, :n0], n_pool), (kc, vc, n_pool + n0)]

        # Local context of local chunk m: [chunk m-1 | chunk m], the first taken from the bank.
        if n0 > 0:
            prev_k = torch.cat([st["bank_k"][:, :, n0 - 1 : n0].to(kc.dtype), kc[:, :, : M - 1]], dim=2)
            prev_v = torch.cat([st["bank_v"][:, :, n0 - 1 : n0].to(vc.dtype), vc[:, :, : M - 1]], dim=2)
        else:
            prev_k = F.pad(kc[:, :, : M - 1], (0, 0, 0, 0, 1, 0))
            prev_v = F.pad(vc[:, :, : M - 1], (0, 0, 0, 0, 1, 0))
        local_k = repeat_kv(torch.cat([prev_k, kc], dim=3), groups)  # (B, H, M, 2C, D)
        local_v = repeat_kv(torch.cat([prev_v, vc], dim=3), groups)
        chunk_ids = n0 + torch.arange(M, device=device)  # index in the exact stream (bank + local)
        causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
        prev_ok = (chunk_ids >= 1)[:, None, None].expand(M, C, C)
        local_mask = torch.cat([prev_ok, causal.expand(M, C, C)], dim=-1)  # (M, C, 2C)

        n_total = n_pool + n0 + n_full
        per_chunk = max(1, B * H * min(C * self.top_k, max(n_total, 1)) * C * D)
        block = max(1, GATHER_BUDGET.get(device.type, GATHER_BUDGET["cpu"]) // per_chunk)
        # Gathering from bank and new chunks separately reads both and merges with torch.where per block;
        # one copy of the bank next to the new chunks is cheaper once the blocks gather more chunks than the
        # bank holds (a long prefill), never for small calls against a long bank.
        gathered = -(-M // block) * min(C * self.top_k, max(n_total, 1))
        if 0 < n0 <= gathered:
            exact_sources = [
                (
                    torch.cat([st["bank_k"][:, :, :n0].to(kc.dtype), kc], dim=2),
                    torch.cat([st["bank_v"][:, :, :n0].to(vc.dtype), vc], dim=2),
                    n_pool,
                )
            ]
        outputs, routing = [], [] if self.routing_log is not None else None
        backend = retrieval_backend(q.is_cuda) if state is None else "torch"
        if backend == "triton":
            from hydralm.kernels.retrieval.triton_sparse import retrieval_attention_triton

            y = retrieval_attention_triton(q, k, v, C, self.top_k)
            outputs, block = [F.pad(y, (0, 0, 0, pad)).unflatten(2, (M, C))], M
        elif backend == "flex":
            from hydralm.kernels.retrieval.flex import flex_retrieval_supported, retrieval_flex

            if flex_retrieval_supported(N, C):
                outputs, block = [retrieval_flex(q, k, v, C, self.top_k).unflatten(2, (M, C))], M
        if outputs and routing is not None:  # the fused kernels route inside themselves: the same routing, for the log
            routing.append(route_tokens(qc, summary_parts, (chunk_ids - 1).clamp(min=0)[:, None], self.top_k))
        for a in range(0 if not outputs else M, M, block):
            b = min(M, a + block)
            q_blk = qc[:, :, a:b]
            # a token of local chunk m may pick any retrievable chunk older than its previous chunk
            n_eligible = (n_pool + chunk_ids[a:b] - 1).clamp(min=0)[:, None]
            selected, valid = route_tokens(q_blk, summary_parts, n_eligible, self.top_k)  # (B, H, m, C, k)
            if routing is not None:
                routing.append((selected, valid))
            union, union_valid, reads = union_of_selections(selected, valid, max(n_total, 1))
            exact_k, exact_v = _gather_exact(union, exact_sources)
            extra_k, extra_v, extra_mask = local_k[:, :, a:b], local_v[:, :, a:b], local_mask[a:b]
            if n_pool:
                pool_k, pool_v, pool_reads = self._gather_pool(union, reads, st, n_pool, groups)
                extra_k = torch.cat([pool_k, extra_k], dim=-2)
                extra_v = torch.cat([pool_v, extra_v], dim=-2)
                extra_mask = torch.cat([pool_reads, extra_mask.expand(*pool_reads.shape[:-1], -1)], dim=-1)
                reads = reads & (union >= n_pool)[..., None, :]
            outputs.append(sparse_chunk_attention(q_blk, exact_k, exact_v, reads, extra_k, extra_v, extra_mask))
        y = torch.cat(outputs, dim=2).flatten(2, 3)[:, :, filled:length]
        if routing is not None:
            picks = [torch.cat(part, dim=2).flatten(2, 3)[:, :, filled:length] for part in zip(*routing)]
            self.routing_log.append(routing_entry(*picks, st, self.chunk_size))

        if self.memory is not None and self.training and torch.is_grad_enabled():
            self.memory_loss = self._memory_loss(qc, kc, vc, n_full)
        if self.routing_targets is not None and state is None and self.training and torch.is_grad_enabled():
            self.routing_loss = answer_routing_loss(q, summaries_new, *self.routing_targets, C)

        # New state: completed chunks join the bank; the remainder becomes the chunk in progress.
        remainder = length - n_full * C
        new = dict(
            st,
            bank_k=_append(st["bank_k"], n0, kc[:, :, :n_full]),
            bank_v=_append(st["bank_v"], n0, vc[:, :, :n_full]),
            summaries=_append(st["summaries"], n0, summaries_new),
            n_chunks=n0 + n_full,
            # clones: views would keep this call's whole key/value tensors alive inside the state
            buf_k=kc[:, :, n_full].clone() if remainder else torch.zeros_like(st["buf_k"]),
            buf_v=vc[:, :, n_full].clone() if remainder else torch.zeros_like(st["buf_v"]),
            pos=st["pos"] + N,
        )
        return y, self._enforce_memory(new)

    def step(self, x_t: torch.Tensor, st: dict):
        """x_t (B, d_model) -> (B, d_model); O(retrievable chunks * D) routing + O(k * C * D) attention."""
        C, groups = self.chunk_size, self.proj.kv_groups
        n, filled, n_pool = st["n_chunks"], st["pos"] % C, st.get("n_pool", 0)
        q, k, v = self.proj.split(x_t[:, None])  # (B, H, 1, D), (B, H_kv, 1, D)
        # a copy, not in place (callers may roll back to the old state); Python-int indices and scalars keep
        # the step free of host-device synchronisation on a GPU
        buf_k, buf_v = st["buf_k"].clone(), st["buf_v"].clone()
        buf_k[:, :, filled] = k[:, :, 0].to(buf_k.dtype)
        buf_v[:, :, filled] = v[:, :, 0].to(buf_v.dtype)
        bank_k, bank_v = st["bank_k"][:, :, :n], st["bank_v"][:, :, :n]
        parts = [st["summaries"][:, :, :n]]
        if n_pool:
            parts.insert(0, st["pool_summaries"][:, :, :n_pool])
        eligible = torch.full((), max(n_pool + n - 1, 0), device=x_t.device)  # all but the previous chunk
        selected, valid = route_tokens(q, parts, eligible, self.top_k)  # (B, H, 1, k)
        if self.routing_log is not None:
            self.routing_log.append(routing_entry(selected, valid, st, C))
        if n > 0:
            exact_k, exact_v = _gather_exact(selected[:, :, 0], [(bank_k, bank_v, n_pool)])
            prev_k, prev_v = bank_k[:, :, n - 1], bank_v[:, :, n - 1]
        else:  # nothing completed yet: placeholders, all masked
            exact_k = exact_v = buf_k.new_zeros(*selected[:, :, 0].shape, C, buf_k.shape[-1])
            prev_k, prev_v = torch.zeros_like(buf_k), torch.zeros_like(buf_v)
        local_k = repeat_kv(torch.cat([prev_k, buf_k], dim=2), groups)  # (B, H, 2C, D)
        local_v = repeat_kv(torch.cat([prev_v, buf_v], dim=2), groups)
        slots = torch.arange(C, device=x_t.device)
        local_mask = torch.cat([torch.full((C,), n > 0, device=x_t.device), slots <= filled])[None]
        local_mask = local_mask.expand(*q.shape[:2], 1, 2 * C)
        reads = valid
        if n_pool:
            pool_k, pool_v, pool_reads = self._gather_pool(selected[:, :, 0], valid, st, n_pool, groups)
            local_k, local_v = torch.cat([pool_k, local_k], dim=-2), torch.cat([pool_v, local_v], dim=-2)
            local_mask = torch.cat([pool_reads, local_mask], dim=-1)
            reads = valid & (selected >= n_pool)
        y = sparse_chunk_attention(q, exact_k, exact_v, reads, local_k, local_v, local_mask)
        new = dict(st, buf_k=buf_k, buf_v=buf_v, pos=st["pos"] + 1)
        if filled == C - 1:  # the chunk just completed: it joins the bank
            new = self.complete_chunk(new)
        return self.proj.merge(y)[:, 0], new

    def complete_chunk(self, st: dict) -> dict:
        """The state once its full buffer joins the bank as a completed chunk (memory enforced)."""
        n, buf_k, buf_v = st["n_chunks"], st["buf_k"], st["buf_v"]
        new = dict(
            st,
            bank_k=_append(st["bank_k"], n, buf_k[:, :, None]),
            bank_v=_append(st["bank_v"], n, buf_v[:, :, None]),
            summaries=_append(st["summaries"], n, _summarise(buf_k[:, :, None])),
            n_chunks=n + 1,
            buf_k=torch.zeros_like(buf_k),
            buf_v=torch.zeros_like(buf_v),
        )
        return self._enforce_memory(new)

    # -- compressive memory ----------------------------------------------------------------------
    def _gather_pool(self, union: torch.Tensor, reads: torch.Tensor, st: dict, n_pool: int, groups: int):
        """Compressed slots of the selected pool chunks, flattened, and which queries may read them."""
        Cr = self.slots_per_compressed
        pool_k = gather_chunks(st["pool_k"][:, :, :n_pool], union).flatten(-3, -2)  # (..., u * Cr, D)
        pool_v = gather_chunks(st["pool_v"][:, :, :n_pool], union).flatten(-3, -2)
        pool_reads = (reads & (union < n_pool)[..., None, :]).repeat_interleave(Cr, dim=-1)
        return pool_k, pool_v, pool_reads

    def _enforce_memory(self, st: dict) -> dict:
        """Keep exact_window tokens exact; compress older chunks into the pool; evict past pool_size."""
        if self.memory is None:
            return st
        n, E = st["n_chunks"], self.exact_chunks
        overflow = max(0, n - E)
        with torch.no_grad():
            old_k, old_v = st["bank_k"][:, :, :overflow], st["bank_v"][:, :, :overflow]
            B, h_kv, _, C, D = old_k.shape
            ck, cv = self.memory.compress(
                old_k.reshape(B, h_kv, overflow * C, D), old_v.reshape(B, h_kv, overflow * C, D)
            )
            ck = ck.reshape(B, h_kv, overflow, self.slots_per_compressed, D)
            cv = cv.reshape(B, h_kv, overflow, self.slots_per_compressed, D)
            pool = {
                name: torch.cat([st[name][:, :, : st["n_pool"]], new.to(st[name].dtype)], dim=2)
                for name, new in (("pool_k", ck), ("pool_v", cv), ("pool_summaries", st["summaries"][:, :, :overflow]))
            }
            n_pool = st["n_pool"] + overflow
            evict = max(0, n_pool - self.pool_chunks)
            new = dict(
                st,
                n_pool=n_pool - evict,
                compressed=st["compressed"] + overflow,
                evicted=st["evicted"] + evict,
                n_chunks=n - overflow,
            )
            for name, value in pool.items():  # fixed capacity: state bytes do not grow with the stream
                new[name] = _fit(value[:, :, evict:], self.pool_chunks)
            for name in ("bank_k", "bank_v", "summaries"):
                new[name] = _fit(st[name][:, :, overflow:n], E + 1)
        return new

    def _memory_loss(self, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n_full: int) -> torch.Tensor:
        """Attention reconstruction of each completed chunk as read by the queries of the chunk after it."""
        if n_full < 2:
            return qc.new_zeros(())
        B, H, _, C, D = qc.shape
        h_kv = kc.shape[1]
        q = qc[:, :, 1:n_full].transpose(1, 2).reshape(-1, H, C, D)  # chunks as batch
        k = kc[:, :, : n_full - 1].transpose(1, 2).reshape(-1, h_kv, C, D)
        v = vc[:, :, : n_full - 1].transpose(1, 2).reshape(-1, h_kv, C, D)
        return self.memory.reconstruction_loss(q, k, v)


def _gather_exact(union: torch.Tensor, sources: List[Tuple[torch.Tensor, torch.Tensor, int]]):
    """Exact chunks for global ids: each source holds ids offset .. offset + n - 1; ids elsewhere are filled
    from another source or masked by the caller."""
    out_k = out_v = None
    for chunks_k, chunks_v, offset in sources:
        n = chunks_k.shape[2]
        if n == 0:
            continue
        k, v = gather_chunks(chunks_k, union, offset), gather_chunks(chunks_v, union, offset)
        if out_k is None:
            out_k, out_v = k, v
        else:
            here = ((union >= offset) & (union < offset + n))[..., None, None]
            out_k, out_v = torch.where(here, k.to(out_k.dtype), out_k), torch.where(here, v.to(out_v.dtype), out_v)
    return out_k, out_v


def _summarise(chunks: torch.Tensor) -> torch.Tensor:
    """Chunk summaries: the mean key, in fp32 at least. (B, H_kv, n, C, D) -> (B, H_kv, n, D)."""
    return chunks.to(torch.promote_types(chunks.dtype, torch.float32)).mean(-2)


def _fit(x: torch.Tensor, capacity: int) -> torch.Tensor:
    """x (B, H, n, ...) copied into a zero tensor of `capacity` entries along axis 2 (n <= capacity)."""
    out = x.new_zeros(*x.shape[:2], capacity, *x.shape[3:])
    out[:, :, : x.shape[2]] = x
    return out


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
