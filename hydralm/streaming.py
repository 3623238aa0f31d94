"""StreamingEngine: read an arbitrarily long token stream chunk by chunk, then generate from it.

The engine keeps one decode state (batch B, fixed by the first tokens it sees) and the next-token logits
of the last token read. ``process`` / ``stream`` feed tokens through the parallel forward in pieces of
``chunk_size`` tokens with the state carried between pieces, which equals one forward over the whole
stream (claim C1); ``extend_and_generate`` continues from that state without re-reading anything.
Only the state and one chunk's activations are ever in memory, so a million-token stream costs what the
model's state costs: constant for DeltaNet and SWA layers; retrieval banks keep every chunk (O(N)) unless
``HydraConfig.memory`` is set, whose compressive memory bounds them (claim C4). ``peak_state_bytes`` reports
that number honestly (hydralm.state).
"""

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Union

import torch

from hydralm.generation import check_integer, decode, inference_mode, model_device
from hydralm.model import HydraLM
from hydralm.modules.mixer import DecodeState
from hydralm.state import clone_state, state_bytes
from hydralm.token_sampling import check_sampling

TokenChunk = Union[torch.Tensor, Iterable[int]]

# Default piece sizes. A piece costs the host a fixed ~2,000 PyTorch calls whatever its length, so on a GPU small
# pieces leave it idle: HydraLM-160m with memory streamed 116 / 202 / 275 / 286 ktok/s to 1M tokens in pieces of
# 8k / 16k / 32k / 64k on an H200 (docs/benchmarks.md). A CPU is busy either way; there pieces stay small.
DEFAULT_CHUNK_SIZE = {"cuda": 32768, "cpu": 4096}


@dataclass
class StreamStats:
    """What one ``process`` / ``stream`` call did."""

    tokens_processed: int = 0  # tokens per row read by this call
    chunks: int = 0  # forward calls made by this call
    peak_state_bytes: int = 0  # largest state_bytes(state) after any chunk of this call
    elapsed_seconds: float = 0.0
    total_tokens: int = 0  # tokens per row read since the last reset

    @property
    def tokens_per_second(self) -> float:
        """Tokens per row per second (multiply by the batch size for total throughput)."""
        return self.tokens_processed / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


class StreamingEngine:
    """Feed a long stream to a HydraLM in chunks and generate continuations from its state.

    engine = StreamingEngine(model)                 # pieces of 32768 tokens on a GPU, 4096 elsewhere
    stats = engine.process(token_tensor)            # (N,) or (B, N), or any iterable of ints (batch 1)
    stats = engine.stream(iterable_of_chunks)       # chunks of any size, re-cut into chunk_size pieces
    new = engine.extend_and_generate(question, 32)  # (B, T) new tokens
    engine.reset()

    The model is used in eval mode under no_grad while the engine works; its training flag is restored
    after each call.
    """

    state: Optional[DecodeState]  # the stream's decode state (None before the first token)
    last_logits: Optional[torch.Tensor]  # next-token logits after the last token read (B, V)
    batch_size: Optional[int]
    total_tokens: int

    def __init__(
        self, model: HydraLM, chunk_size: Optional[int] = None, device: Optional[Union[str, torch.device]] = None
    ) -> None:
        """chunk_size: tokens per forward (piece); None = DEFAULT_CHUNK_SIZE for the device (the result does not
        depend on it, only speed and activation memory do)."""
        self.device = torch.device(device) if device is not None else model_device(model)
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK_SIZE["cuda" if self.device.type == "cuda" else "cpu"]
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.model, self.chunk_size = model, chunk_size
        self.reset()

    def reset(self) -> None:
        """Forget the stream: no state, no tokens."""
        self.state, self.last_logits, self.batch_size, self.total_tokens = None, None, None, 0

    def fork(self) -> "StreamingEngine":
        """An independent engine at the same point of the stream (a deep copy of the state), e.g. to ask
        several questions about one long document without re-reading it."""
        other = StreamingEngine(self.model, self.chunk_size, self.device)
        other.state, other.batch_size, other.total_tokens = clone_state(self.state), self.batch_size, self.total_tokens
        other.last_logits = None if self.last_logits is None else self.last_logits.clone()
        return other

    # -- reading --------------------------------------------------------------------------------
    def process(self, tokens: TokenChunk) -> StreamStats:
        """Read tokens: a 1-D tensor (batch 1), a (B, N) tensor, or any iterable of ints (batch 1, consumed
        lazily, chunk_size at a time)."""
        if torch.is_tensor(tokens):
            return self.stream([tokens])
        iterator = iter(tokens)
        return self.stream(iter(lambda: list(itertools.islice(iterator, self.chunk_size)), []))

    def stream(self, chunks: Iterable[TokenChunk]) -> StreamStats:
        """Read an iterable of chunks (each a 1-D or (B, n) tensor, or a list of ints) of any sizes. Tokens
        are regrouped into pieces of exactly chunk_size (the last piece may be shorter), so the result does
        not depend on how the input was cut."""
        stats = StreamStats(peak_state_bytes=state_bytes(self.state))
        started = time.perf_counter()
        carry = None  # fewer than chunk_size tokens waiting for the next input chunk
        with inference_mode(self.model):
            for chunk in chunks:
                chunk = self._as_batch(chunk)
                if chunk.shape[1] == 0:
                    continue
                if carry is not None and carry.shape[0] != chunk.shape[0]:
                    raise ValueError(
                        f"chunks of one stream must share the batch size: got {chunk.shape[0]} after {carry.shape[0]}"
                    )
                joined = chunk if carry is None else torch.cat([carry, chunk], dim=1)
                start = 0
                while joined.shape[1] - start >= self.chunk_size:
                    self._feed(joined[:, start : start + self.chunk_size], stats)
                    start += self.chunk_size
                carry = joined[:, start:] if start < joined.shape[1] else None
            if carry is not None:
                self._feed(carry, stats)
        stats.elapsed_seconds = time.perf_counter() - started
        stats.total_tokens = self.total_tokens
        return stats

    def _as_batch(self, chunk: TokenChunk) -> torch.Tensor:
        if torch.is_tensor(chunk):
            check_integer(chunk)
        ids = torch.as_tensor(chunk if torch.is_tensor(chunk) else list(chunk), dtype=torch.long)
        # The id range is checked here, once per input and where the ids are (on the host before they move),
        # not by each piece's forward: on a GPU that check reads two numbers back, and a read per piece kept the
        # host from queueing the next piece while the GPU worked.
        ids = self.model._checked_ids(ids).to(self.device)
        ids = ids.reshape(1, -1) if ids.dim() <= 1 else ids
        if ids.dim() != 2 or ids.shape[0] == 0:
            raise ValueError(f"a chunk must be 1-D or (batch >= 1, n), got shape {tuple(ids.shape)}")
        batch = self.batch_size if self.batch_size is not None else ids.shape[0]
        if ids.shape[0] != batch:
            raise ValueError(
                f"the engine's stream has batch size {batch}, got a chunk of shape {tuple(ids.shape)}; "
                f"call reset() to start a stream with another batch size"
            )
        return ids

    def _feed(self, ids: torch.Tensor, stats: StreamStats) -> None:
        out = self.model(ids, state=self.state, return_state=True, logits_to_keep=1, check_id_range=False)
        self.state, self.last_logits = out["state"], out["logits"][:, -1]
        self.batch_size = ids.shape[0]
        self.total_tokens += ids.shape[1]
        stats.tokens_processed += ids.shape[1]
        stats.chunks += 1
        stats.peak_state_bytes = max(stats.peak_state_bytes, state_bytes(self.state))

    # -- generating -----------------------------------------------------------------------------
    def extend_and_generate(
        self,
        tokens: Optional[TokenChunk],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        keep_generated: bool = True,
    ) -> torch.Tensor:
        """Read `tokens` (may be None or empty), then sample up to max_new_tokens from the stream's state.

        Returns the new tokens (B, T), same rules as ``generate`` (rows that emitted eos are padded with
        pad_token_id, default eos, which may be any int; T < max_new_tokens when every row finished).
        keep_generated=True makes these tokens part of the stream (the state then continues after them), except
        that a finished row's padding enters the stream as its eos token repeated (the padding may be no token
        at all, e.g. -1); False leaves the engine where `tokens` left it (use ``fork`` to keep several branches).
        """
        check_sampling(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if tokens is not None:
            self.process(tokens)
        if self.last_logits is None:
            raise ValueError("extend_and_generate needs at least one token in the stream (none read since reset)")
        if max_new_tokens == 0:
            return self.last_logits.new_zeros(self.last_logits.shape[0], 0, dtype=torch.long)
        with inference_mode(self.model):
            new, state, logits = decode(
                self.model,
                self.state,
                self.last_logits,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                eos_token_id,
                pad_token_id,
                generator,
                drop_finished=False,
                feed_last=keep_generated,
            )
        if keep_generated:
            self.state, self.last_logits = state, logits
            self.total_tokens += new.shape[1]
        return new
