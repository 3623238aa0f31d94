"""Chunk-sparse top-k retrieval attention mixer (routing and kernel in kernels/retrieval/).

No positional encoding (NoPE): a chunk summary is the mean of its keys, and rotating keys by position would
make means of distant chunks incomparable; position information comes from the DeltaNet and SWA layers.

Decode state (RetrievalState):
  buf_k, buf_v    (B, H_kv, C, D)             the chunk in progress (pos % C tokens filled)
  bank_k, bank_v  (B, H_kv, S, C, D)          completed chunks: chunk j in slot j % S
  summaries       (B, H_kv, S, D)             mean key of each of them (fp32)
  pool_k, pool_v  (B, H_kv, P, C / r, D)      compressed chunks (memory only): compressed chunk j in slot j % P
  pool_summaries  (B, H_kv, P, D)             their exact mean keys (fp32)
  pos             tokens seen; every count (completed, compressed, evicted chunks) follows from it
Without ``HydraConfig.memory`` nothing is compressed (P = 0) and the bank keeps every chunk: S >= completed
chunks grows by doubling, and completed chunks are written into spare capacity in place. An older state only
reads its own completed chunks, so keeping an old state and continuing from it later (rollback) is exact; two
continuations from one state that are both still in use need an independent copy (``LayerState.clone``).
With memory (a CompressiveMemory per layer) the bank is a ring of S = exact_window / C chunks: a chunk that
leaves the exact window is compressed to C / compress_every slots (r = compress_every) and written to the
pool, a ring of P = pool_size * r / C chunks whose oldest entries are overwritten (evicted). Compressed chunks
keep their exact routing summary, so tokens still route to them and read their compressed slots; evicted chunks
are gone. Every shape is then fixed: ``step`` reads the rings under masks, so it compiles and captures.
What a token reads depends on its position only (the chunk schedule), never on how the stream was cut into
calls: the parallel path compresses on the fly the chunks a token must read compressed (docs/architecture.md,
section 3.3.1).

``step_many`` (T tokens, speculative verification) takes at most C tokens at a time, so at most one chunk completes
among them: queries after the completion see the state it leads to (the next chunk's local context, the chunk that
left the exact window in compressed form) through masks over the old rings plus that one compressed chunk, and
nothing is written; ``state_after`` then applies the kept tokens exactly as ``step`` would.
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from hydralm.config import HydraConfig, config_error
from hydralm.kernels.attention.local import repeat_kv
from hydralm.kernels.backend import (
    decode_verify_backend,
    retrieval_backend,
    retrieval_decode_backend,
    stream_routing_backend,
)
from hydralm.kernels.retrieval.gather import gather_chunks, sparse_chunk_attention, union_of_selections
from hydralm.kernels.retrieval.routing import route_tokens, topk_lowest_id
from hydralm.modules.attention import AttentionProjections
from hydralm.modules.compressive_memory import CompressiveMemory
from hydralm.modules.linear import PLAIN_IO, BlockIO
from hydralm.modules.mixer import Counter, LayerState, Trail
from hydralm.modules.multi_token import kept_in_piece, pieces, ring_ids
from hydralm.modules.routing_log import ring_routing_entry, routing_entry
from hydralm.modules.routing_loss import answer_routing_loss
from hydralm.modules.slots import positions, read_slot, where, write_slot

# Largest gathered key block (elements) the parallel path materialises at once; bounds prefill memory.
# Each block also costs one host sync and ~60 kernel launches: on a GPU, whose memory is large and whose
# launches dominate small blocks, blocks are 16x larger.
GATHER_BUDGET = {"cpu": 1 << 24, "cuda": 1 << 28}


@dataclass
class RetrievalState(LayerState):
    buf_k: torch.Tensor
    buf_v: torch.Tensor
    bank_k: torch.Tensor
    bank_v: torch.Tensor
    summaries: torch.Tensor
    pool_k: torch.Tensor
    pool_v: torch.Tensor
    pool_summaries: torch.Tensor
    pos: Counter

    COUNTERS: ClassVar[Tuple[str, ...]] = ("pos",)
    FP32_FIELDS: ClassVar[Tuple[str, ...]] = ("summaries", "pool_summaries")

    # -- counts (all follow from pos) --------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        return self.buf_k.shape[2]

    @property
    def has_memory(self) -> bool:
        return self.pool_k.shape[2] > 0

    @property
    def completed(self) -> int:
        """Chunks completed since the stream began."""
        return int(self.pos) // self.chunk_size

    @property
    def n_chunks(self) -> int:
        """Completed chunks held exactly in the bank."""
        return min(self.completed, self.bank_k.shape[2]) if self.has_memory else self.completed

    @property
    def compressed(self) -> int:
        """Chunks compressed so far (pooled or evicted since)."""
        return self.completed - self.n_chunks

    @property
    def n_pool(self) -> int:
        """Compressed chunks held in the pool."""
        return min(self.compressed, self.pool_k.shape[2])

    @property
    def evicted(self) -> int:
        """Compressed chunks evicted from the full pool."""
        return self.compressed - self.n_pool

    # -- the state in stream order -------------------------------------------------------------------------
    def exact_chunks(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and summaries of the exact chunks, oldest first: (B, H_kv, n_chunks, ...)."""
        n, end = self.n_chunks, self.completed
        if not self.has_memory:  # chunk j in slot j: a view, no copy
            return self.bank_k[:, :, :n], self.bank_v[:, :, :n], self.summaries[:, :, :n]
        slots = torch.arange(end - n, end, device=self.bank_k.device) % self.bank_k.shape[2]
        return tuple(t.index_select(2, slots) for t in (self.bank_k, self.bank_v, self.summaries))

    def pooled_chunks(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compressed keys, values and summaries of the pooled chunks, oldest first: (B, H_kv, n_pool, ...)."""
        n, end, P = self.n_pool, self.compressed, self.pool_k.shape[2]
        slots = torch.arange(end - n, end, device=self.pool_k.device) % max(P, 1)
        return tuple(t.index_select(2, slots) for t in (self.pool_k, self.pool_v, self.pool_summaries))

    def contents(self) -> Dict[str, object]:
        """Valid entries in stream order: stale ring slots and spare capacity are not part of the state."""
        filled = int(self.pos) % self.chunk_size
        exact, pooled = self.exact_chunks(), self.pooled_chunks()
        return {
            "buf_k": self.buf_k[:, :, :filled],
            "buf_v": self.buf_v[:, :, :filled],
            **dict(zip(("bank_k", "bank_v", "summaries"), exact)),
            **dict(zip(("pool_k", "pool_v", "pool_summaries"), pooled)),
            "pos": int(self.pos),
        }

    @classmethod
    def stack(cls, states):
        # banks without memory may differ in spare capacity: stack their used prefixes
        states = [s if s.has_memory else s._trimmed() for s in states]
        return super().stack(states)

    def _trimmed(self) -> "RetrievalState":
        n = self.n_chunks
        return dataclasses.replace(
            self, bank_k=self.bank_k[:, :, :n], bank_v=self.bank_v[:, :, :n], summaries=self.summaries[:, :, :n]
        )


class RetrievalAttention(nn.Module):
    state_class = RetrievalState

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
        self.routing_loss_detach_query = cfg.retrieval_routing_loss_detach_query
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

    @staticmethod
    def check_config(cfg: HydraConfig) -> None:
        """Retrieval layers compress whole chunks: the memory sizes must line up with retrieval_chunk_size."""
        if cfg.memory is None:
            return
        C, m = cfg.retrieval_chunk_size, cfg.memory
        if m["exact_window"] % C or m["exact_window"] < C:
            raise config_error("memory.exact_window", m["exact_window"], f"a multiple of retrieval_chunk_size={C}")
        if C % m["compress_every"]:
            raise config_error("memory.compress_every", m["compress_every"], f"a divisor of retrieval_chunk_size={C}")
        if m["pool_size"] < C // m["compress_every"]:
            raise config_error(
                "memory.pool_size",
                m["pool_size"],
                f">= retrieval_chunk_size / compress_every = {C // m['compress_every']} (one compressed chunk)",
            )

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> RetrievalState:
        B, h_kv, D, C = batch_size, self.proj.n_kv_heads, self.proj.head_dim, self.chunk_size
        summary_dtype = torch.promote_types(dtype, torch.float32)
        S = self.exact_chunks if self.memory is not None else 0
        P = self.pool_chunks if self.memory is not None else 0
        Cr = self.slots_per_compressed if self.memory is not None else C
        return RetrievalState(
            buf_k=torch.zeros(B, h_kv, C, D, device=device, dtype=dtype),
            buf_v=torch.zeros(B, h_kv, C, D, device=device, dtype=dtype),
            bank_k=torch.zeros(B, h_kv, S, C, D, device=device, dtype=dtype),
            bank_v=torch.zeros(B, h_kv, S, C, D, device=device, dtype=dtype),
            summaries=torch.zeros(B, h_kv, S, D, device=device, dtype=summary_dtype),
            pool_k=torch.zeros(B, h_kv, P, Cr, D, device=device, dtype=dtype),
            pool_v=torch.zeros(B, h_kv, P, Cr, D, device=device, dtype=dtype),
            pool_summaries=torch.zeros(B, h_kv, P, D, device=device, dtype=summary_dtype),
            pos=0,
        )

    def state_growth(self) -> Optional[str]:
        if self.memory is None:
            return "without HydraConfig.memory their chunk banks grow with the stream"
        return None

    def forward(self, x: torch.Tensor, state: Optional[RetrievalState] = None) -> Tuple[torch.Tensor, RetrievalState]:
        q, k, v = self.proj.split(x)
        y, state = self.attend(q, k, v, state)
        return self.proj.merge(y), state

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[RetrievalState] = None
    ) -> Tuple[torch.Tensor, RetrievalState]:
        """The parallel path on projected heads: q (B, H, N, D), k/v (B, H_kv, N, D) -> (B, H, N, D), state.

        Every token reads what ``step`` would read at its position: with memory, a chunk older than the
        token's exact window is read compressed and an evicted chunk not at all, however the stream is cut
        into calls (the chunk schedule, not the call schedule)."""
        B, H, N, D = q.shape
        st = state if state is not None else self.init_state(B, q.device, k.dtype)
        if N == 0:
            return q.new_zeros(B, H, 0, D), st
        C, device = self.chunk_size, q.device
        pos0 = int(st.pos)
        c0, filled = pos0 // C, pos0 % C
        bank_k, bank_v, bank_sum = st.exact_chunks()  # oldest first
        pool_k, pool_v, pool_sum = st.pooled_chunks()
        n0, n_pool = bank_k.shape[2], pool_k.shape[2]
        first = c0 - n0 - n_pool  # global id of the oldest retrievable chunk (local index 0 below)
        # Lay the new tokens on the chunk grid that continues the state: the `filled` buffered tokens of
        # the chunk in progress come first (their queries are placeholders whose outputs are dropped).
        k = torch.cat([st.buf_k[:, :, :filled].to(k.dtype), k], dim=2)
        v = torch.cat([st.buf_v[:, :, :filled].to(v.dtype), v], dim=2)
        q = F.pad(q, (0, 0, filled, 0))
        length = filled + N
        M, n_full = -(-length // C), length // C  # local chunks, completed local chunks
        pad = M * C - length
        qc = F.pad(q, (0, 0, 0, pad)).unflatten(2, (M, C))  # (B, H, M, C, D)
        kc = F.pad(k, (0, 0, 0, pad)).unflatten(2, (M, C))  # (B, H_kv, M, C, D)
        vc = F.pad(v, (0, 0, 0, pad)).unflatten(2, (M, C))
        summaries_new = _summarise(kc[:, :, :n_full])
        # Retrievable chunks by local index, oldest first: pool, exact bank, completed new chunks.
        summary_parts = [s for s in (pool_sum, bank_sum, summaries_new) if s.shape[2]] or [summaries_new]
        chunk_ids = c0 + torch.arange(M, device=device)  # global id of each local chunk

        # A token of global chunk i picks among the chunks older than its previous chunk that are still held
        # (with memory: i - E - P .. i - 2, older ones are evicted) and reads those below i - E compressed, as
        # `step` does. Local index j is global chunk first + j.
        routable_end = chunk_ids - 1 - first  # exclusive
        window = self._memory_window(chunk_ids, c0 + M - 1, first)
        compressed_sources = []
        if window is not None:  # every chunk a token may read compressed, compressed as the pool holds it
            compressed_sources = [(pool_k, pool_v, 0)]
            if n0:
                compressed_sources.append((*self._compress_chunks(bank_k, bank_v), n_pool))
            if n_full:
                compressed_sources.append((*self._compress_chunks(kc[:, :, :n_full], vc[:, :, :n_full]), n_pool + n0))

        outputs, routing = [], [] if self.routing_log is not None else None
        backend = retrieval_backend(q.is_cuda)
        from_scratch = state is None and window is None
        # A call with a state or compressed reads (prefill, streaming) runs the kernels' forward on the routing
        # computed here; it has no backward, so such a call that needs gradients takes the gather path.
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        with_sources = backend == "triton" and not from_scratch and (c0 == 0 or n0 >= 1) and not needs_grad
        if with_sources:
            y = self._attend_from_sources(
                qc, kc, vc, (bank_k, bank_v), compressed_sources, summary_parts, routable_end, window, routing,
                (n_pool, n0, n_full, filled, length),
            )  # fmt: skip
            outputs = [F.pad(y, (0, 0, 0, pad)).unflatten(2, (M, C))]
        elif backend == "triton" and from_scratch:
            from hydralm.kernels.retrieval.triton_sparse import retrieval_attention_triton

            y = retrieval_attention_triton(q, k, v, C, self.top_k)
            outputs = [F.pad(y, (0, 0, 0, pad)).unflatten(2, (M, C))]
        elif backend == "flex" and from_scratch:
            from hydralm.kernels.retrieval.flex import flex_retrieval_supported, retrieval_flex

            if flex_retrieval_supported(N, C):
                outputs = [retrieval_flex(q, k, v, C, self.top_k).unflatten(2, (M, C))]
        if outputs and routing is not None and not with_sources:  # the fused kernels route inside themselves
            routing.append(route_tokens(qc, summary_parts, routable_end.clamp(min=0)[:, None], self.top_k))
        if not outputs:
            outputs = self._attend_gather(
                qc, kc, vc, (bank_k, bank_v), compressed_sources, summary_parts, routable_end, window, routing,
                (n_pool, n0, n_full, c0),
            )  # fmt: skip
        y = torch.cat(outputs, dim=2).flatten(2, 3)[:, :, filled:length]
        if routing is not None:
            picks = [torch.cat(part, dim=2).flatten(2, 3)[:, :, filled:length] for part in zip(*routing)]
            self.routing_log.append(routing_entry(*picks, st, self.chunk_size))

        if self.memory is not None and self.training and torch.is_grad_enabled():
            self.memory_loss = self._memory_loss(qc, kc, vc, n_full)
        if self.routing_targets is not None and state is None and self.training and torch.is_grad_enabled():
            routing_q = q.detach() if self.routing_loss_detach_query else q  # detached: reading keeps its queries
            self.routing_loss = answer_routing_loss(routing_q, summaries_new, *self.routing_targets, C)

        # New state: completed chunks join the bank; the remainder becomes the chunk in progress.
        remainder = length - n_full * C
        buf_k = kc[:, :, n_full].clone() if remainder else torch.zeros_like(st.buf_k)
        buf_v = vc[:, :, n_full].clone() if remainder else torch.zeros_like(st.buf_v)
        pos = pos0 + N
        if self.memory is None:  # chunk j in slot j: appended into spare capacity
            new = RetrievalState(
                buf_k=buf_k,
                buf_v=buf_v,
                bank_k=_append(st.bank_k, n0, kc[:, :, :n_full]),
                bank_v=_append(st.bank_v, n0, vc[:, :, :n_full]),
                summaries=_append(st.summaries, n0, summaries_new),
                pool_k=st.pool_k,
                pool_v=st.pool_v,
                pool_summaries=st.pool_summaries,
                pos=pos,
            )
            return y, new
        exact = [
            torch.cat([old.to(new.dtype), new], dim=2)
            for old, new in ((bank_k, kc[:, :, :n_full]), (bank_v, vc[:, :, :n_full]), (bank_sum, summaries_new))
        ]
        return y, self._memory_state(st, exact, (pool_k, pool_v, pool_sum), buf_k, buf_v, pos)

    def _attend_gather(
        self, qc, kc, vc, bank, compressed_sources, summary_parts, routable_end, window, routing, counts
    ) -> List[torch.Tensor]:
        """The PyTorch path: per block of query chunks, the union of their picks gathered from the bank and the
        call's chunks (compressed where read compressed) and one masked softmax with the local context
        [chunk m-1 | chunk m]. Returns the outputs (B, H, m, C, D) per block."""
        n_pool, n0, n_full, c0 = counts
        bank_k, bank_v = bank
        B, H, M, C, D = qc.shape
        device, groups = qc.device, self.proj.kv_groups
        # Local context of local chunk m: [chunk m-1 | chunk m], the first taken from the bank.
        if n0 > 0:
            prev_k = torch.cat([bank_k[:, :, n0 - 1 : n0].to(kc.dtype), kc[:, :, : M - 1]], dim=2)
            prev_v = torch.cat([bank_v[:, :, n0 - 1 : n0].to(vc.dtype), vc[:, :, : M - 1]], dim=2)
        else:
            prev_k = F.pad(kc[:, :, : M - 1], (0, 0, 0, 0, 1, 0))
            prev_v = F.pad(vc[:, :, : M - 1], (0, 0, 0, 0, 1, 0))
        local_k = repeat_kv(torch.cat([prev_k, kc], dim=3), groups)  # (B, H, M, 2C, D)
        local_v = repeat_kv(torch.cat([prev_v, vc], dim=3), groups)
        causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
        prev_ok = (c0 + torch.arange(M, device=device) >= 1)[:, None, None].expand(M, C, C)
        local_mask = torch.cat([prev_ok, causal.expand(M, C, C)], dim=-1)  # (M, C, 2C)

        n_total = n_pool + n0 + n_full
        slots = C + (self.slots_per_compressed if window is not None else 0)  # gathered slots per chunk read
        per_chunk = max(1, B * H * min(C * self.top_k, max(n_total, 1)) * slots * D)
        block = max(1, GATHER_BUDGET.get(device.type, GATHER_BUDGET["cpu"]) // per_chunk)
        # Gathering from bank and new chunks separately reads both and merges with torch.where per block;
        # one copy of the bank next to the new chunks is cheaper once the blocks gather more chunks than the
        # bank holds (a long prefill), never for small calls against a long bank.
        exact_sources = [(bank_k, bank_v, n_pool), (kc, vc, n_pool + n0)]
        gathered = -(-M // block) * min(C * self.top_k, max(n_total, 1))
        if 0 < n0 <= gathered:
            exact_sources = [
                (torch.cat([bank_k.to(kc.dtype), kc], dim=2), torch.cat([bank_v.to(vc.dtype), vc], dim=2), n_pool)
            ]
        outputs = []
        for a in range(0, M, block):
            b = min(M, a + block)
            q_blk = qc[:, :, a:b]
            end = routable_end[a:b, None].clamp(min=0)
            start = None if window is None else window[0][a:b, None]
            selected, valid = route_tokens(q_blk, summary_parts, end, self.top_k, start)  # (B, H, m, C, k)
            if routing is not None:
                routing.append((selected, valid))
            union, union_valid, reads = union_of_selections(selected, valid, max(n_total, 1))
            exact_k, exact_v = _gather_exact(union, exact_sources)
            local = (local_k[:, :, a:b], local_v[:, :, a:b], local_mask[a:b].expand(B, H, -1, -1, -1))
            compressed = None
            if compressed_sources:
                comp_k, comp_v = _gather_exact(union, compressed_sources)  # (B, H, m, u, C / r, D)
                below = union[..., None, :] < window[1][a:b, None, None]  # (B, H, m, 1, u): read compressed
                compressed = (comp_k, comp_v, reads & below)
                reads = reads & ~below
            outputs.append(_attention_by_row(q_blk, (exact_k, exact_v, reads), compressed, local, union_valid))
        return outputs

    def _attend_from_sources(
        self, qc, kc, vc, bank, compressed_sources, summary_parts, routable_end, window, routing, counts
    ) -> torch.Tensor:
        """The Triton kernels' forward for a call with a state or compressed reads: routing as the gather path
        routes, each pick read from the exact chunks (bank, then this call's completed chunks) or from their
        compressed form, the local context [chunk i-1 | chunk i] laid out as from scratch (the previous chunk from
        the bank prepended). Returns (B, H, filled + N, D) on the call's chunk grid."""
        from hydralm.kernels.retrieval.triton_sparse import retrieval_forward_from_sources

        n_pool, n0, n_full, filled, length = counts
        B, H, M, C, D = qc.shape
        picks = self._route_call(qc, summary_parts, routable_end.clamp(min=0), window, routing)
        # picks: (B, H, M, C, k) local chunk ids, -1 = none
        if window is None:
            exact_ids, compressed_ids = picks - n_pool, None  # nothing pooled: no chunk is read compressed
        else:
            below = picks < window[1][:, None, None]  # read compressed
            exact_ids = torch.where(below, -1, picks - n_pool)
            compressed_ids = torch.where(below, picks, -1)
        exact_ids = torch.where(picks >= 0, exact_ids, -1)
        bank_k, bank_v = bank
        prev = 1 if n0 else 0  # chunk i-1 of the call's first chunk comes from the bank
        # rows of the previous chunk and of the `filled` buffered tokens are placeholders: they pick nothing and
        # their outputs are dropped
        placeholder = torch.arange(prev * C + length, device=qc.device) < prev * C + filled

        def rows_of(ids: torch.Tensor) -> torch.Tensor:
            ids = F.pad(ids.flatten(2, 3)[:, :, :length], (0, 0, prev * C, 0), value=-1)
            return torch.where(placeholder[:, None], -1, ids)

        chunks = lambda t: t.flatten(2, 3)  # noqa: E731
        exact_k = torch.cat([chunks(bank_k).to(kc.dtype), chunks(kc[:, :, :n_full])], dim=2)
        exact_v = torch.cat([chunks(bank_v).to(vc.dtype), chunks(vc[:, :, :n_full])], dim=2)
        sources = [(rows_of(exact_ids), exact_k, exact_v, C)]
        if compressed_ids is not None:
            comp_k = torch.cat([chunks(k_) for k_, _, _ in compressed_sources], dim=2)
            comp_v = torch.cat([chunks(v_) for _, v_, _ in compressed_sources], dim=2)
            sources.append((rows_of(compressed_ids), comp_k, comp_v, self.slots_per_compressed))
        q_local = F.pad(qc.flatten(2, 3)[:, :, :length], (0, 0, prev * C, 0))
        k_local = chunks(kc)[:, :, :length]
        v_local = chunks(vc)[:, :, :length]
        if prev:
            k_local = torch.cat([bank_k[:, :, n0 - 1].to(kc.dtype), k_local], dim=2)
            v_local = torch.cat([bank_v[:, :, n0 - 1].to(vc.dtype), v_local], dim=2)
        y = retrieval_forward_from_sources(q_local, k_local, v_local, C, sources)
        return y[:, :, prev * C :]

    def _route_call(self, qc, summary_parts, end, window, routing) -> torch.Tensor:
        """Picks of a call with a state: the token of local chunk m among summaries [window[0][m], end[m]) (local
        ids over pool, bank and the call's completed chunks) -> (B, H, M, C, k) ids, -1 = none. One Triton kernel
        with HYDRALM_STREAM_ROUTING=triton; else PyTorch scores and top-k, at most 2^28 scores at a time."""
        B, H, M, C, _ = qc.shape
        if stream_routing_backend(qc.is_cuda) == "triton":
            from hydralm.kernels.retrieval.triton_routing import route_ranges_triton

            first = torch.zeros_like(end) if window is None else window[0]
            summaries = torch.cat(summary_parts, dim=2)
            picks = route_ranges_triton(qc.flatten(2, 3), summaries, C, self.top_k, first, end).unflatten(2, (M, C))
            if routing is not None:
                routing.append((picks.clamp(min=0).long(), picks >= 0))
            return picks.long()
        picks = []
        n_total = max(sum(part.shape[2] for part in summary_parts), 1)
        step = max(1, (1 << 28) // (B * H * C * n_total))
        for a in range(0, M, step):
            b = min(M, a + step)
            start = None if window is None else window[0][a:b, None]
            selected, valid = route_tokens(qc[:, :, a:b], summary_parts, end[a:b, None], self.top_k, start)
            if routing is not None:
                routing.append((selected, valid))
            picks.append(torch.where(valid, selected, -1))
        return torch.cat(picks, dim=2)

    def _memory_state(self, st: RetrievalState, exact, pooled, buf_k, buf_v, pos: int) -> RetrievalState:
        """The state after `pos` tokens from its exact chunks and pooled chunks in stream order (the exact ones
        may include chunks that have left the window: they are compressed into the pool here)."""
        completed, E, P = pos // self.chunk_size, self.exact_chunks, self.pool_chunks
        n = exact[0].shape[2]
        leaving = max(0, n - E)  # the oldest exact chunks, ids completed - n ..
        with torch.no_grad():
            if leaving:
                old_k, old_v = exact[0][:, :, :leaving], exact[1][:, :, :leaving]
                ck, cv = self.memory.compress(old_k.flatten(2, 3), old_v.flatten(2, 3))
                Cr = self.slots_per_compressed
                pooled = [
                    torch.cat([p.to(new.dtype), new], dim=2)
                    for p, new in zip(
                        pooled,
                        (ck.unflatten(2, (leaving, Cr)), cv.unflatten(2, (leaving, Cr)), exact[2][:, :, :leaving]),
                    )
                ]
            exact = [t[:, :, leaving:] for t in exact]
            pooled = [t[:, :, max(0, t.shape[2] - P) :] for t in pooled]
            compressed = completed - exact[0].shape[2]
            bank = [
                _ring(t.to(like.dtype), completed - t.shape[2], E)
                for t, like in zip(exact, (st.bank_k, st.bank_v, st.summaries))
            ]
            pool = [
                _ring(t.to(like.dtype), compressed - t.shape[2], P)
                for t, like in zip(pooled, (st.pool_k, st.pool_v, st.pool_summaries))
            ]
        return RetrievalState(
            buf_k=buf_k,
            buf_v=buf_v,
            bank_k=bank[0],
            bank_v=bank[1],
            summaries=bank[2],
            pool_k=pool[0],
            pool_v=pool[1],
            pool_summaries=pool[2],
            pos=pos,
        )

    def step(
        self, x_t: torch.Tensor, st: RetrievalState, io: BlockIO = PLAIN_IO
    ) -> Tuple[torch.Tensor, RetrievalState]:
        """x_t (B, d_model) -> (B, d_model); O(retrievable chunks * D) routing + O(k * C * D) attention.

        Reads the bank and pool rings whole under masks of the chunks each slot holds, so with memory every
        shape is fixed and ``pos`` may be a device counter (StaticDecoder). A chunk completes inside the step:
        it joins the bank, and the chunk leaving the exact window is compressed into the pool."""
        q, k, v = self.proj.split(x_t[:, None], io)  # (B, H, 1, D), (B, H_kv, 1, D)
        if self._updates_in_place(st, q):
            y = self._step_in_place(q, k, v, st, st.pos)
            return self.proj.merge(y, io)[:, 0], dataclasses.replace(st, pos=st.pos + 1)
        C, pos = self.chunk_size, st.pos
        c, filled = pos // C, pos % C  # the chunk in progress, tokens already in it
        buf_k = write_slot(st.buf_k, 2, filled, k[:, :, 0])
        buf_v = write_slot(st.buf_v, 2, filled, v[:, :, 0])
        bank_k, bank_v, summaries = st.bank_k, st.bank_v, st.summaries
        if self.memory is None and bank_k.shape[2] < c + 1:  # room for the chunk in progress (host int c)
            bank_k, bank_v, summaries = (_grow(t, max(c + 1, 2 * t.shape[2])) for t in (bank_k, bank_v, summaries))
        y = self._step_attention_at(q, st, buf_k, buf_v, bank_k, bank_v, summaries, pos)
        # The chunk completes with this token: it joins the bank in slot c % S.
        complete = filled == C - 1
        rings = self._complete_chunk(st, bank_k, bank_v, summaries, c, buf_k, buf_v, complete)
        buf_k, buf_v = where(complete, torch.zeros_like(buf_k), buf_k), where(complete, torch.zeros_like(buf_v), buf_v)
        new = RetrievalState(buf_k, buf_v, *rings, pos=pos + 1)
        return self.proj.merge(y, io)[:, 0], new

    def _step_in_place(self, q, k, v, st: RetrievalState, pos: torch.Tensor) -> torch.Tensor:
        """The token at position `pos` on a StaticDecoder's buffers: its key and value written where they lie, the
        attention, then a completing chunk moved into the rings by the ring-update kernel. q (B, H, 1, D) ->
        (B, H, 1, D); `st` holds the state after the token (its pos is the caller's to advance)."""
        from hydralm.kernels.retrieval.triton_ring_update import retrieval_complete_chunk_

        index = (pos % self.chunk_size).reshape(1)
        st.buf_k.index_copy_(2, index, k.to(st.buf_k.dtype))
        st.buf_v.index_copy_(2, index, v.to(st.buf_v.dtype))
        y = self._step_attention_at(q, st, st.buf_k, st.buf_v, st.bank_k, st.bank_v, st.summaries, pos)
        rings = (st.bank_k, st.bank_v, st.summaries, st.pool_k, st.pool_v, st.pool_summaries)
        retrieval_complete_chunk_(st.buf_k, st.buf_v, *rings, self.memory.pool_query, pos)
        return y

    def _step_attention_at(self, q, st, buf_k, buf_v, bank_k, bank_v, summaries, pos: Counter) -> torch.Tensor:
        """The token at `pos` (its key already in buf_k / buf_v) attends: routing over [pool | bank] slots, a token
        of chunk c picking among chunks 0 .. c - 2 still held, and its local context. (B, H, 1, D)."""
        C, device = self.chunk_size, q.device
        c, filled = pos // C, pos % C
        S, P = bank_k.shape[2], st.pool_k.shape[2]
        slot_ids = ring_ids(c - 1, S, device)  # the chunk each bank slot holds (< 0: none)
        routable = (slot_ids >= 0) & (slot_ids <= c - 2)
        if P:  # compressed chunk j sits in pool slot j % P
            pool_ids = ring_ids(c - self.exact_chunks - 1, P, device)
            routable = torch.cat([pool_ids >= 0, routable])
            slot_ids = torch.cat([pool_ids, slot_ids])
        if not self._fused_step(q, P + S):
            return self._step_attention(q, st, buf_k, buf_v, bank_k, bank_v, summaries, slot_ids, routable, c, filled)
        from hydralm.kernels.retrieval.triton_decode import retrieval_decode_step

        pos_t = pos if torch.is_tensor(pos) else torch.tensor(pos, device=device)
        return retrieval_decode_step(
            q[:, :, 0], buf_k, buf_v, bank_k, bank_v, summaries, st.pool_k, st.pool_v, st.pool_summaries,
            slot_ids, routable, pos_t, self.top_k,
        )[0][:, :, None]  # fmt: skip

    def _updates_in_place(self, st: RetrievalState, q: torch.Tensor) -> bool:
        """Whether this step writes the token and a completing chunk into `st`'s own tensors with the ring-update
        kernel (kernels/retrieval/triton_ring_update.py): on a StaticDecoder's buffers (``st.in_place``, fixed
        shapes with memory, a device counter) when HYDRALM_RETRIEVAL_DECODE picks Triton at any row count."""
        return (
            st.in_place
            and self.memory is not None
            and torch.is_tensor(st.pos)
            and all(t.is_contiguous() for t in st.tensors().values())
            and retrieval_decode_backend(q.is_cuda) == "triton"
        )

    def _fused_step(self, q: torch.Tensor, slots: int) -> bool:
        """Whether this step runs as one Triton kernel (HYDRALM_RETRIEVAL_DECODE): not while logging picks, and for
        at most MAX_SLOTS held chunks."""
        if self.routing_log is not None or retrieval_decode_backend(q.is_cuda, q.shape[0]) != "triton":
            return False
        from hydralm.kernels.retrieval.triton_decode import MAX_SLOTS

        return slots <= MAX_SLOTS

    def _step_attention(self, q, st, buf_k, buf_v, bank_k, bank_v, summaries, slot_ids, routable, c, filled):
        """The PyTorch step's routing and attention: q (B, H, 1, D) -> (B, H, 1, D)."""
        C, groups, device = self.chunk_size, self.proj.kv_groups, q.device
        S, P = bank_k.shape[2], st.pool_k.shape[2]
        B, H = q.shape[:2]
        dtype = torch.promote_types(q.dtype, torch.float32)
        rows = q.to(dtype).reshape(B, H // groups, groups, 1, -1)
        parts = [st.pool_summaries, summaries] if P else [summaries]
        scores = torch.cat([rows @ s.to(dtype).transpose(-1, -2)[:, :, None] for s in parts], dim=-1)
        scores = scores.reshape(B, H, 1, P + S).masked_fill(~routable, float("-inf"))
        # ties go to the lowest chunk id, as in the parallel path (not the lowest slot)
        top, selected = topk_lowest_id(scores, min(self.top_k, P + S), ids=slot_ids)  # (B, H, 1, k) slots
        valid = torch.isfinite(top)
        if self.routing_log is not None:
            self.routing_log.append(ring_routing_entry(slot_ids[selected], valid, st, self.top_k))
        exact_k = gather_chunks(bank_k, selected[:, :, 0], offset=P)  # pool picks are clamped, then masked
        exact_v = gather_chunks(bank_v, selected[:, :, 0], offset=P)
        reads = valid & (selected >= P)
        # local context: the previous chunk (slot (c - 1) % S, none before the first) and the chunk in progress
        previous = (c - 1) % S
        local_k = repeat_kv(torch.cat([read_slot(bank_k, 2, previous), buf_k], dim=2), groups)  # (B, H, 2C, D)
        local_v = repeat_kv(torch.cat([read_slot(bank_v, 2, previous), buf_v], dim=2), groups)
        in_chunk = torch.arange(C, device=device)
        local_mask = torch.cat([(in_chunk < C) & (c > 0), in_chunk <= filled]).expand(B, H, 1, 2 * C)
        if P:
            read_k = gather_chunks(st.pool_k, selected[:, :, 0]).flatten(-3, -2)  # bank picks clamped, then masked
            read_v = gather_chunks(st.pool_v, selected[:, :, 0]).flatten(-3, -2)
            pool_reads = (valid & (selected < P)).repeat_interleave(st.pool_k.shape[3], dim=-1)
            local_k, local_v = torch.cat([read_k, local_k], dim=-2), torch.cat([read_v, local_v], dim=-2)
            local_mask = torch.cat([pool_reads, local_mask], dim=-1)
        return sparse_chunk_attention(q, exact_k, exact_v, reads, local_k, local_v, local_mask)

    # -- several tokens at once (speculative verification) ----------------------------------------
    def step_many(self, x: torch.Tensor, st: RetrievalState, io: BlockIO = PLAIN_IO) -> Tuple[torch.Tensor, Trail]:
        """x (B, T, d_model) -> (y (B, T, d_model), trail of the new keys and values (B, H_kv, T, D)): T steps
        with one pass over the projections; `st` is left as it was."""
        q, k, v = self.proj.split(x, io)
        if self._verifies_in_place(st, q):
            return self.proj.merge(self._verify_in_place(q, k, v, st), io), {"k": k, "v": v}
        outputs = []
        for start, n in pieces(x.shape[1], self.chunk_size):
            part = slice(start, start + n)
            outputs.append(self._attend_next(q[:, :, part], k[:, :, part], v[:, :, part], st))
            if start + n < x.shape[1]:
                st = self._advance(st, k[:, :, part], v[:, :, part], n)
        return self.proj.merge(torch.cat(outputs, dim=2), io), {"k": k, "v": v}

    def state_after(self, state: RetrievalState, trail: Trail, kept: Counter) -> RetrievalState:
        if self._verifies_in_place(state, trail["k"]) and torch.is_tensor(kept):
            return self._replay_in_place(state, trail, kept)
        for start, n in pieces(trail["k"].shape[2], self.chunk_size):
            part = slice(start, start + n)
            state = self._advance(state, trail["k"][:, :, part], trail["v"][:, :, part], kept_in_piece(kept, start, n))
        return state

    # -- speculative verification on a StaticDecoder's buffers, with the step's kernels ---------------------
    def _verifies_in_place(self, st: RetrievalState, q: torch.Tensor) -> bool:
        """Whether T tokens are verified as T in-place steps (``_verify_in_place``): on the buffers the
        ring-update kernel writes, for T <= C tokens (a verify completes at most one chunk), when
        HYDRALM_DECODE_VERIFY=kernels."""
        return (
            decode_verify_backend() == "kernels"
            and 1 < self.chunk_size
            and q.shape[2] <= self.chunk_size
            and self._updates_in_place(st, q)
        )

    def _verify_in_place(self, q, k, v, st: RetrievalState) -> torch.Tensor:
        """What T ``step`` calls on these buffers give, with the same kernels and so the same bits (speculative
        decoding then matches greedy decoding token for token), and the buffers as they were: the slots the T steps
        may write (the chunk in progress, the bank slot of chunk c, the pool slot it would leave into) are saved
        first and written back after. q (B, H, T, D) -> (B, H, T, D)."""
        saved = [(tensor, index, tensor.index_select(2, index)) for tensor, index in self._verify_slots(st)]
        outputs = [
            self._step_in_place(q[:, :, j : j + 1], k[:, :, j : j + 1], v[:, :, j : j + 1], st, st.pos + j)
            for j in range(q.shape[2])
        ]
        for tensor, index, values in saved:
            tensor.index_copy_(2, index, values)
        return torch.cat(outputs, dim=2)

    def _verify_slots(self, st: RetrievalState) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, slots along dim 2) that up to C steps from st.pos may write."""
        C, device = self.chunk_size, st.buf_k.device
        S, P = st.bank_k.shape[2], st.pool_k.shape[2]
        c = st.pos // C
        whole = torch.arange(C, device=device)
        slots = [(st.buf_k, whole), (st.buf_v, whole)]
        slots += [(t, (c % S).reshape(1)) for t in (st.bank_k, st.bank_v, st.summaries)]
        if P:
            slots += [(t, ((c - S) % P).reshape(1)) for t in (st.pool_k, st.pool_v, st.pool_summaries)]
        return slots

    def _replay_in_place(self, st: RetrievalState, trail: Trail, kept: torch.Tensor) -> RetrievalState:
        """``state_after`` on a StaticDecoder's buffers: the first `kept` (a device counter) of the verified tokens
        written and their chunk moved as ``step`` does, with the same kernel, so the state is the steps' bit for
        bit; the other tokens write back what their slot held and run the ring update at a position that
        completes nothing (0)."""
        from hydralm.kernels.retrieval.triton_ring_update import retrieval_complete_chunk_

        rings = (st.bank_k, st.bank_v, st.summaries, st.pool_k, st.pool_v, st.pool_summaries)
        for j in range(trail["k"].shape[2]):
            live, pos = j < kept, st.pos + j
            index = (pos % self.chunk_size).reshape(1)
            for buf, new in ((st.buf_k, trail["k"]), (st.buf_v, trail["v"])):
                value = torch.where(live, new[:, :, j : j + 1].to(buf.dtype), buf.index_select(2, index))
                buf.index_copy_(2, index, value)
            retrieval_complete_chunk_(
                st.buf_k, st.buf_v, *rings, self.memory.pool_query, torch.where(live, pos, torch.zeros_like(pos))
            )
        return dataclasses.replace(st, pos=st.pos + kept)

    def _attend_next(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, st: RetrievalState) -> torch.Tensor:
        """The n <= C tokens right after `st`: q (B, H, n, D), k/v (B, H_kv, n, D) -> (B, H, n, D), what n
        ``step`` calls would give, from `st` without writing it.

        Token j belongs to chunk c or, once chunk c completes before it (`crossed`), to chunk c + 1. Then its
        routable chunks are those up to c - 1 (chunk c - 1 moves from its local context to the bank), the chunk
        that left the exact window when chunk c completed is read compressed (one extra candidate, compressed
        here), the pool chunk that completion evicted is gone, and its local context is [chunk c | chunk c + 1].
        """
        C, groups, device = self.chunk_size, self.proj.kv_groups, q.device
        B, H, n, D = q.shape
        c, filled = st.pos // C, st.pos % C
        bank_k, bank_v, summaries = st.bank_k, st.bank_v, st.summaries
        if self.memory is None and bank_k.shape[2] < c + 1:  # as in step: room for chunk c (host int c)
            bank_k, bank_v, summaries = (_grow(t, max(c + 1, 2 * t.shape[2])) for t in (bank_k, bank_v, summaries))
        S, P = bank_k.shape[2], st.pool_k.shape[2]
        crossed = positions(filled, n, device) >= C  # (n,)
        chunk = c + crossed.long()  # the chunk each token is in

        # Routing candidates: [pool slots | bank slots | the chunk compressed when chunk c completes].
        bank_ids = ring_ids(c - 1, S, device)
        routable = [(bank_ids >= 0) & (bank_ids <= chunk[:, None] - 2)]
        if self.memory is not None:
            routable[0] = routable[0] & (bank_ids >= chunk[:, None] - S)  # chunk c - S leaves the exact window
        ids, parts = [bank_ids], [summaries]
        leaving = None
        may_cross = torch.is_tensor(filled) or filled + n > C  # a known "no" skips the compressed candidate
        if P:
            pool_ids = ring_ids(c - self.exact_chunks - 1, P, device)
            routable.insert(0, (pool_ids >= 0) & (pool_ids >= chunk[:, None] - self.exact_chunks - P))
            ids.insert(0, pool_ids)
            parts.insert(0, st.pool_summaries)
            if may_cross:
                slot = c % S  # holds chunk c - S, compressed into the pool when chunk c completes
                leaving = self.memory.compress(read_slot(bank_k, 2, slot), read_slot(bank_v, 2, slot))
                routable.append(crossed[:, None] & (c >= S))
                ids.append(positions(c - S, 1, device))
                parts.append(read_slot(summaries, 2, slot)[:, :, None])
        slot_ids, routable_mask = torch.cat(ids), torch.cat(routable, dim=-1)  # (N,), (n, N)
        dtype = torch.promote_types(q.dtype, torch.float32)
        rows = q.to(dtype).reshape(B, H // groups, groups, n, D)
        scores = torch.cat([rows @ s.to(dtype).transpose(-1, -2)[:, :, None] for s in parts], dim=-1)
        scores = scores.reshape(B, H, n, -1).masked_fill(~routable_mask, float("-inf"))
        # ties go to the lowest chunk id, as in step and the parallel path
        top, selected = topk_lowest_id(scores, min(self.top_k, slot_ids.shape[0]), ids=slot_ids)  # (B, H, n, k)
        valid = torch.isfinite(top)
        exact_k = gather_chunks(bank_k, selected, offset=P)  # (B, H, n, k, C, D); other picks masked
        exact_v = gather_chunks(bank_v, selected, offset=P)
        reads = valid & (selected >= P) & (selected < P + S)

        # Local context on one axis: [chunk c - 1 (bank) | chunk c so far, then the new tokens (C + n)].
        new_slots = positions(filled, n, device)
        current_k = torch.cat([st.buf_k, st.buf_k.new_zeros(B, k.shape[1], n, D)], 2)
        current_k = current_k.index_copy(2, new_slots, k.to(st.buf_k.dtype))
        current_v = torch.cat([st.buf_v, st.buf_v.new_zeros(B, v.shape[1], n, v.shape[-1])], 2)
        current_v = current_v.index_copy(2, new_slots, v.to(st.buf_v.dtype))
        previous = (c - 1) % S
        local_k = repeat_kv(torch.cat([read_slot(bank_k, 2, previous), current_k], dim=2), groups)[:, :, None]
        local_v = repeat_kv(torch.cat([read_slot(bank_v, 2, previous), current_v], dim=2), groups)[:, :, None]
        entry = torch.arange(2 * C + n, device=device)
        rel_chunk = entry // C  # 0: chunk c - 1, 1: chunk c, 2: chunk c + 1
        query_entry = C + new_slots  # where each token sits on that axis
        local_mask = (
            (entry[None] <= query_entry[:, None])
            & (rel_chunk[None] >= crossed.long()[:, None])  # its previous chunk and its own
            & ((rel_chunk >= 1) | (c > 0))[None]  # there is no chunk before chunk 0
        )[:, None]  # (n, 1, 2C + n)
        if P:
            pool_k, pool_v, in_pool = st.pool_k, st.pool_v, selected < P
            if leaving is not None:
                pool_k = torch.cat([pool_k, leaving[0][:, :, None].to(pool_k.dtype)], dim=2)
                pool_v = torch.cat([pool_v, leaving[1][:, :, None].to(pool_v.dtype)], dim=2)
                in_pool = in_pool | (selected == P + S)
            index = torch.where(selected < P, selected, P)  # the compressed candidate is entry P
            Cr = pool_k.shape[3]
            read_k = gather_chunks(pool_k, index).flatten(-3, -2)  # (B, H, n, k * Cr, D)
            read_v = gather_chunks(pool_v, index).flatten(-3, -2)
            pool_reads = (valid & in_pool).repeat_interleave(Cr, dim=-1)[:, :, :, None]
            local_k = torch.cat([read_k, local_k.expand(-1, -1, n, -1, -1)], dim=-2)
            local_v = torch.cat([read_v, local_v.expand(-1, -1, n, -1, -1)], dim=-2)
            local_mask = torch.cat([pool_reads, local_mask.expand(B, H, n, 1, -1)], dim=-1)
        queries = q[:, :, :, None]  # each token is its own block of one query: (B, H, n, 1, D)
        y = sparse_chunk_attention(queries, exact_k, exact_v, reads[:, :, :, None], local_k, local_v, local_mask)
        return y[:, :, :, 0]

    def _advance(self, st: RetrievalState, k: torch.Tensor, v: torch.Tensor, kept: Counter) -> RetrievalState:
        """The state after the first `kept` of n <= C new tokens: what ``step`` leaves after them (their keys
        in the chunk in progress; chunk c, if it completes, into the bank and the chunk it displaces into the
        pool), with the same writes whatever `kept` is when it is a device counter."""
        if not torch.is_tensor(kept) and kept == 0:
            return st
        C, device = self.chunk_size, k.device
        B, h_kv, n, D = k.shape
        c, filled = st.pos // C, st.pos % C
        new_slots = positions(filled, n, device)
        current_k = torch.cat([st.buf_k, st.buf_k.new_zeros(B, h_kv, n, D)], 2)
        current_k = current_k.index_copy(2, new_slots, k.to(st.buf_k.dtype))  # chunk c, then chunk c + 1
        current_v = torch.cat([st.buf_v, st.buf_v.new_zeros(B, h_kv, n, v.shape[-1])], 2)
        current_v = current_v.index_copy(2, new_slots, v.to(st.buf_v.dtype))
        end = filled + kept  # tokens of chunk c held after the kept ones (> C: some are in chunk c + 1)
        complete = end >= C
        slot_index = torch.arange(C, device=device)[:, None]
        next_k, next_v = (F.pad(t[:, :, C:], (0, 0, 0, C - n)) for t in (current_k, current_v))
        # slots past the kept tokens are zero, as step leaves them: no trace of a token that was not kept
        buf_k = where(complete, next_k.where(slot_index < end - C, 0), current_k[:, :, :C].where(slot_index < end, 0))
        buf_v = where(complete, next_v.where(slot_index < end - C, 0), current_v[:, :, :C].where(slot_index < end, 0))
        chunk_k, chunk_v = current_k[:, :, :C], current_v[:, :, :C]
        rings = self._complete_chunk(st, st.bank_k, st.bank_v, st.summaries, c, chunk_k, chunk_v, complete)
        return RetrievalState(buf_k, buf_v, *rings, pos=st.pos + kept)

    def _complete_chunk(
        self,
        st: RetrievalState,
        bank_k: torch.Tensor,
        bank_v: torch.Tensor,
        summaries: torch.Tensor,
        c: Counter,
        chunk_k: torch.Tensor,
        chunk_v: torch.Tensor,
        complete: Union[bool, torch.Tensor],
    ) -> Tuple[torch.Tensor, ...]:
        """Chunk c (B, H_kv, C, D) joins the bank when `complete` (a bool, or a device flag: the writes are then
        masked); with memory the chunk it displaces from slot c % S leaves the exact window, compressed into the
        pool. Returns (bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries)."""
        pool_k, pool_v, pool_summaries = st.pool_k, st.pool_v, st.pool_summaries
        if self.memory is None:
            if complete:  # host ints without memory; into spare capacity, in place: older states never read slot c
                bank_k = _append(bank_k, c, chunk_k[:, :, None])
                bank_v = _append(bank_v, c, chunk_v[:, :, None])
                summaries = _append(summaries, c, _summarise(chunk_k[:, :, None]))
            return bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries
        S, P = bank_k.shape[2], pool_k.shape[2]
        slot = c % S  # holds chunk c - S
        leaving = complete & (c >= S)
        if torch.is_tensor(leaving) or leaving:  # a known False skips the compression
            ck, cv = self.memory.compress(read_slot(bank_k, 2, slot), read_slot(bank_v, 2, slot))
            pool_slot = (c - S) % P
            pool_k = write_slot(pool_k, 2, pool_slot, ck, leaving)
            pool_v = write_slot(pool_v, 2, pool_slot, cv, leaving)
            pool_summaries = write_slot(pool_summaries, 2, pool_slot, read_slot(summaries, 2, slot), leaving)
        bank_k = write_slot(bank_k, 2, slot, chunk_k, complete)
        bank_v = write_slot(bank_v, 2, slot, chunk_v, complete)
        summaries = write_slot(summaries, 2, slot, _summarise(chunk_k[:, :, None])[:, :, 0], complete)
        return bank_k, bank_v, summaries, pool_k, pool_v, pool_summaries

    # -- compressive memory ----------------------------------------------------------------------
    def _memory_window(
        self, chunk_ids: torch.Tensor, last: int, first: int
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Per local chunk (global ids `chunk_ids`, the newest `last`; local index j is global chunk first + j): the
        first local index its tokens may pick (older chunks are evicted) and the local index below which they read
        chunks compressed. None when no token of the call reads a chunk compressed (memory off, or every token's exact
        window reaches back to the oldest chunk held)."""
        if self.memory is None or last - self.exact_chunks <= first:
            return None
        E, P = self.exact_chunks, self.pool_chunks
        return (chunk_ids - E - P - first).clamp(min=0), chunk_ids - E - first

    def _compress_chunks(self, chunks_k: torch.Tensor, chunks_v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, H_kv, n, C, D) exact chunks -> (B, H_kv, n, C / compress_every, D) compressed, as the pool holds them."""
        assert self.memory is not None
        n = chunks_k.shape[2]
        ck, cv = self.memory.compress(chunks_k.flatten(2, 3), chunks_v.flatten(2, 3))
        return ck.unflatten(2, (n, self.slots_per_compressed)), cv.unflatten(2, (n, self.slots_per_compressed))

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


def _attention_by_row(
    q: torch.Tensor,
    exact: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    compressed: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    local: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    union_valid: torch.Tensor,
) -> torch.Tensor:
    """sparse_chunk_attention of a block of chunks, one batch row at a time on that row's own union size.

    q (B, H, m, C, D); exact = (keys, values (B, H, m, u, C, D), reads (B, H, m, C, u)); compressed = the same with
    C / r slots per chunk, or None; local = (keys, values (B, H, m, L, D), mask (B, H, m, C, L)); union_valid
    (B, H, m, u). The union is padded to the largest in the batch; a row attending over another row's padding
    would round differently as the other rows change, so each row gets exactly its own keys (claim C2 holds
    bit for bit)."""
    B, u = q.shape[0], union_valid.shape[-1]
    sizes = [u] if B == 1 else union_valid.sum(-1).flatten(1).amax(1).clamp(min=1).tolist()  # one host read
    out = []
    for r, size in enumerate(sizes):
        row = slice(r, r + 1)
        chunk_k, chunk_v = (t[row, :, :, :size] for t in exact[:2])
        reads = exact[2][row, ..., :size]
        extra_k, extra_v, extra_mask = (t[row] for t in local)
        if compressed is not None:
            comp_k, comp_v = (t[row, :, :, :size].flatten(-3, -2) for t in compressed[:2])
            comp_mask = compressed[2][row, ..., :size].repeat_interleave(compressed[0].shape[-2], dim=-1)
            extra_k, extra_v = torch.cat([comp_k, extra_k], dim=-2), torch.cat([comp_v, extra_v], dim=-2)
            extra_mask = torch.cat([comp_mask, extra_mask], dim=-1)
        out.append(sparse_chunk_attention(q[row], chunk_k, chunk_v, reads, extra_k, extra_v, extra_mask))
    return out[0] if B == 1 else torch.cat(out, dim=0)


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


def _ring(seq: torch.Tensor, first: int, capacity: int) -> torch.Tensor:
    """A ring of `capacity` entries (axis 2) holding seq's entries, ids first .. first + n - 1, id j in slot
    j % capacity (n <= capacity; the other slots are zero)."""
    n = seq.shape[2]
    out = seq.new_zeros(*seq.shape[:2], capacity, *seq.shape[3:])
    if n == 0:
        return out
    slots = torch.arange(first, first + n, device=seq.device) % capacity
    return out.index_copy(2, slots, seq)


def _grow(bank: torch.Tensor, capacity: int) -> torch.Tensor:
    """A copy of bank with `capacity` entries on axis 2 (the new ones zero): older states keep the old tensor."""
    grown = bank.new_zeros(*bank.shape[:2], capacity, *bank.shape[3:])
    grown[:, :, : bank.shape[2]] = bank
    return grown


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
