"""StreamingEngine: chunked reading = one parallel forward, honest stats, generation from the stream."""

import pytest
import torch
from helpers import LAYER_SETS, assert_states_close, static_model, tiny  # noqa: F401
from helpers import TINY_BASE as BASE

from hydralm import HydraConfig, HydraLM
from hydralm.generation import generate
from hydralm.state import clone_state, state_bytes, states_equal
from hydralm.streaming import DEFAULT_CHUNK_SIZE, StreamingEngine

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("layers", list(LAYER_SETS))
def test_chunked_stream_equals_one_parallel_forward(layers):
    model = tiny(layers)
    tokens = torch.randint(0, 64, (2, 50))
    engine = StreamingEngine(model, chunk_size=7)
    stats = engine.process(tokens)
    with torch.no_grad():
        full = model(tokens, return_state=True)
    torch.testing.assert_close(engine.last_logits, full["logits"][:, -1], rtol=0, atol=1e-4)
    assert_states_close(engine.state, full["state"], atol=1e-4)
    assert stats.tokens_processed == 50 and stats.total_tokens == 50 and stats.chunks == 8  # ceil(50 / 7)
    assert stats.peak_state_bytes >= state_bytes(engine.state) > 0
    assert stats.elapsed_seconds > 0 and stats.tokens_per_second == pytest.approx(50 / stats.elapsed_seconds)
    assert set(stats.to_dict()) >= {
        "tokens_processed",
        "peak_state_bytes",
        "elapsed_seconds",
        "tokens_per_second",
        "chunks",
    }


def test_how_the_input_is_cut_does_not_matter():
    """stream() regroups tokens into chunk_size pieces: ragged input chunks, an iterable of ints and one
    tensor give bit-identical states; the state persists across calls."""
    model = tiny()
    tokens = torch.randint(0, 64, (1, 41))
    whole = StreamingEngine(model, chunk_size=8)
    whole.process(tokens)
    ragged = StreamingEngine(model, chunk_size=8)
    cuts = [0, 3, 4, 17, 18, 30, 41]
    stats = ragged.stream(tokens[:, a:b] for a, b in zip(cuts, cuts[1:]))
    assert stats.chunks == 6  # 41 tokens in pieces of 8
    lazy = StreamingEngine(model, chunk_size=8)
    lazy.process(iter(tokens[0, :20].tolist()))
    second = lazy.process(tokens[0, 20:].tolist())
    assert second.total_tokens == 41 and second.tokens_processed == 21
    assert states_equal(whole.state, ragged.state) and torch.equal(whole.last_logits, ragged.last_logits)
    # two calls (20 + 21 tokens) cut the stream elsewhere: equal up to chunked-prefill rounding
    torch.testing.assert_close(whole.last_logits, lazy.last_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layers", list(LAYER_SETS))
def test_extend_and_generate_equals_generate_on_the_concatenation(layers):
    model = tiny(layers)
    document, question = torch.randint(0, 64, (2, 37)), torch.randint(0, 64, (2, 5))
    engine = StreamingEngine(model, chunk_size=16)
    engine.process(document)
    new = engine.extend_and_generate(question, 12, temperature=0)
    expected = generate(model, torch.cat([document, question], 1), 12, temperature=0)
    assert torch.equal(new, expected[:, 42:])
    # the generated tokens joined the stream: the next answer continues after them
    more = engine.extend_and_generate(question[:, :2], 6, temperature=0)
    expected = generate(model, torch.cat([document, question, new, question[:, :2]], 1), 6, temperature=0)
    assert torch.equal(more, expected[:, -6:]) and engine.total_tokens == 37 + 5 + 12 + 2 + 6


def test_extend_and_generate_with_eos_and_a_pad_id_that_is_no_token():
    """Rows that finished stay in the batch and are fed eos internally: pad_token_id=-1 works for batch >= 2,
    and the tokens are generate's."""
    model = tiny()
    document = torch.randint(0, 64, (3, 20))
    free = generate(model, document, 12, temperature=0)[:, 20:]
    eos = int(free[0, 2])  # row 0 finishes early
    engine = StreamingEngine(model, chunk_size=8)
    engine.process(document)
    new = engine.extend_and_generate(None, 12, temperature=0, eos_token_id=eos, pad_token_id=-1)
    expected = generate(model, document, 12, temperature=0, eos_token_id=eos, pad_token_id=-1)[:, 20:]
    assert torch.equal(new, expected) and (new == -1).any()
    assert engine.total_tokens == 20 + new.shape[1]


def test_a_stream_with_compressive_memory_does_not_depend_on_how_it_is_cut():
    """Memory compresses on the chunk schedule, not the call schedule: pieces of 5 or 16 tokens, one parallel
    forward and generate's prefill read the same chunks exactly / compressed / not at all (90 tokens, chunks of
    8, 2 exact chunks, a pool of 4: chunks compress and are evicted)."""
    model = static_model()
    tokens = torch.randint(0, 64, (2, 90))
    with torch.no_grad():
        full = model(tokens, return_state=True)
    engines = [StreamingEngine(model, chunk_size=n) for n in (5, 16)]
    for engine in engines:
        engine.process(tokens)
        torch.testing.assert_close(engine.last_logits, full["logits"][:, -1], rtol=0, atol=1e-4)
        assert_states_close(engine.state, full["state"], atol=1e-4)
        new = engine.extend_and_generate(None, 10, temperature=0)
        assert torch.equal(new, generate(model, tokens, 10, temperature=0)[:, 90:])


def test_sampled_generation_matches_generate_with_the_same_seed():
    model = tiny()
    document = torch.randint(0, 64, (1, 30))
    engine = StreamingEngine(model, chunk_size=64)
    new = engine.extend_and_generate(
        document, 15, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(5)
    )
    expected = generate(model, document, 15, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(new, expected[:, 30:])


def test_fork_and_keep_generated_false_leave_the_stream_alone():
    model = tiny()
    engine = StreamingEngine(model, chunk_size=16)
    engine.process(torch.randint(0, 64, (1, 25)))
    branch = engine.fork()
    a = branch.extend_and_generate(torch.tensor([3, 4]), 8, temperature=0)
    b = engine.extend_and_generate(torch.tensor([3, 4]), 8, temperature=0, keep_generated=False)
    assert torch.equal(a, b) and engine.total_tokens == 27 and branch.total_tokens == 35
    snapshot = clone_state(engine.state)
    again = engine.extend_and_generate(None, 8, temperature=0, keep_generated=False)
    assert torch.equal(again, b) and states_equal(snapshot, engine.state)  # the answers left no trace


def test_state_bytes_stay_constant_without_retrieval_and_grow_with_it():
    constant = StreamingEngine(
        HydraLM(HydraConfig(**{**BASE, "n_layers": 2, "layer_types": ["deltanet", "swa"]})), chunk_size=32
    )
    sizes = [constant.process(torch.randint(0, 64, (1, 64))).peak_state_bytes for _ in range(3)]
    assert sizes[0] == sizes[1] == sizes[2]
    growing = StreamingEngine(tiny("retrieval"), chunk_size=32)
    sizes = [growing.process(torch.randint(0, 64, (1, 64))).peak_state_bytes for _ in range(3)]
    assert sizes[0] < sizes[1] < sizes[2]  # the retrieval bank keeps every chunk


def test_engine_errors_and_reset():
    model = tiny()
    engine = StreamingEngine(model, chunk_size=4)
    with pytest.raises(ValueError, match="at least one token"):
        engine.extend_and_generate(None, 3)
    engine.process(torch.randint(0, 64, (2, 6)))
    with pytest.raises(ValueError, match="batch size 2"):
        engine.process(torch.randint(0, 64, (3, 6)))
    engine.reset()
    assert engine.state is None and engine.total_tokens == 0
    engine.process(torch.randint(0, 64, (3, 6)))
    with pytest.raises(ValueError, match="chunk_size"):
        StreamingEngine(model, chunk_size=0)
    assert StreamingEngine(model).chunk_size == DEFAULT_CHUNK_SIZE["cpu"]  # the device's default piece
    model.train()
    engine.process(torch.randint(0, 64, (3, 2)))
    assert model.training


def test_ids_are_range_checked_once_per_input_before_anything_is_read(monkeypatch):
    """An out-of-range id is one clear error and the stream is left as it was; a valid input is range-checked
    once, not once per chunk_size piece (on a GPU each check reads back from the device and stalls the queue)."""
    model = tiny()
    engine = StreamingEngine(model, chunk_size=4)
    engine.process(torch.randint(0, 64, (1, 6)))
    before = clone_state(engine.state)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=64\)"):
        engine.process(torch.tensor([[1, 2, 3, 4, 5, 64]]))
    assert states_equal(engine.state, before) and engine.total_tokens == 6

    checks, checked_ids = [], model._checked_ids
    monkeypatch.setattr(
        model, "_checked_ids", lambda ids, check_range=True: checks.append(check_range) or checked_ids(ids, check_range)
    )
    engine.process(torch.randint(0, 64, (1, 13)))  # four pieces
    assert checks.count(True) == 1 and engine.total_tokens == 19


@pytest.mark.slow
def test_a_stream_through_compiled_blocks_equals_the_eager_stream():
    """`model.compile_blocks()` under a StreamingEngine (what `BENCH_STREAM_COMPILE=1` measures on a GPU, where
    the stream is bound by host time per PyTorch call): the same logits and state as the eager stream, with
    compressive memory, over more pieces than it takes the compiled blocks to settle on their shapes."""
    torch.manual_seed(0)
    cfg = HydraConfig.from_preset("tiny", memory=dict(exact_window=64, compress_every=4, pool_size=16), d_model=64)
    model = HydraLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 64 * 6))
    eager = StreamingEngine(model, chunk_size=64)
    eager.process(ids)
    model.compile_blocks(backend="aot_eager")
    compiled = StreamingEngine(model, chunk_size=64)
    for i in range(6):
        compiled.process(ids[:, 64 * i : 64 * (i + 1)])
    assert (compiled.last_logits - eager.last_logits).abs().max() < 1e-5
    assert_states_close(compiled.state, eager.state, 1e-5)
