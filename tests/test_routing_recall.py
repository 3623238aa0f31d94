"""Routing recall: the retrieval layer's routing log and the metric built on it, on a hand-made layer whose
routing is known, through the parallel forward, chunked prefill and step decoding."""

import dataclasses

import pytest
import torch

from hydralm import HydraConfig, HydraLM
from hydralm.data import RetrievalQA
from hydralm.eval.routing_recall import merge_hits, routing_hits, summarize
from hydralm.eval.scoring import task_accuracy
from hydralm.modules.retrieval_attention import RetrievalAttention
from hydralm.modules.routing_log import record_routing, routing_entry
from hydralm.modules.routing_loss import ROUTING_LOSS_TEMPERATURE

C, D = 4, 8  # chunk size, model width (= head width: one head)


def one_hot_layer(top_k: int = 1) -> RetrievalAttention:
    """q = k = v = x: a token routes to the past chunk whose mean key is most like it."""
    cfg = HydraConfig(
        vocab_size=16,
        d_model=D,
        n_layers=1,
        n_heads=1,
        layer_types=["retrieval"],
        retrieval_chunk_size=C,
        retrieval_top_k=top_k,
    )
    layer = RetrievalAttention(cfg).eval()
    with torch.no_grad():
        layer.proj.qkv.weight.copy_(torch.eye(D).repeat(3, 1))
    return layer


def haystack(query_tokens) -> torch.Tensor:
    """6 chunks; every token of chunk j is e_j, except position 22 (chunk 5), which is e_{query_tokens[row]}."""
    x = torch.eye(D)[torch.arange(24) // C].repeat(len(query_tokens), 1, 1)
    for row, token in enumerate(query_tokens):
        x[row, 22] = torch.eye(D)[token]
    return x


# Two queries per row: at 22 (answer in chunk 2 / chunk 1: beyond the local context) and at 21 (answer at 17,
# chunk 4: the previous chunk, local). Row 0 asks for e_2 (routes to chunk 2), row 1 for e_0 (routes to chunk 0).
QUERIES = torch.tensor([[21, 22], [21, 22]])
SOURCES = torch.tensor([[17, 9], [17, 5]])


def test_known_routing_gives_exact_recall():
    layer = one_hot_layer()
    with torch.no_grad():
        layer.routing_log = log = []
        layer(haystack([2, 0]))
        layer.routing_log = None
    (entry,) = log
    assert entry["chunks"][:, 0, 22, 0].tolist() == [2, 0]  # the picks the construction forces
    hits = routing_hits(log, QUERIES, SOURCES)
    assert hits["local"].tolist() == [[True, False], [True, False]]
    assert hits["found"][:, 0].tolist() == [[False, True], [False, False]]  # row 1 routed to 0, answer in 1
    summary = summarize(hits, depths=torch.tensor([[0.9, 0.1], [0.9, 0.4]]))
    assert summary["recall"] == 0.75 and summary["recall_far"] == 0.5 and summary["local_fraction"] == 0.5
    assert summary["chance_far"] == 0.25  # top-1 of the 4 eligible chunks 0..3
    assert summary["by_depth"]["0-25"] == {
        "recall": 1.0,
        "recall_far": 1.0,
        "chance_far": 0.25,
        "queries": 1,
        "far_queries": 1,
    }
    assert summary["by_depth"]["25-50"]["recall_far"] == 0.0
    assert summary["by_depth"]["75-100"] == {
        "recall": 1.0,
        "recall_far": None,
        "chance_far": None,
        "queries": 2,
        "far_queries": 0,
    }


def test_accuracy_split_by_routing_outcome():
    """Row 0's far answer was found, row 1's missed; both local answers right, only the found far one right."""
    layer = one_hot_layer()
    with torch.no_grad():
        layer.routing_log = log = []
        layer(haystack([2, 0]))
    correct = torch.tensor([[True, True], [True, False]])
    summary = summarize(routing_hits(log, QUERIES, SOURCES), correct=correct)
    assert summary["accuracy_local"] == 1.0
    assert summary["accuracy_far_found"] == 1.0 and summary["accuracy_far_missed"] == 0.0
    summary = summarize(routing_hits(log, QUERIES, SOURCES), correct=~correct)  # the split follows `correct`
    assert summary["accuracy_local"] == 0.0 and summary["accuracy_far_missed"] == 1.0


def test_sabotaged_routing_is_caught():
    """The metric follows the routing: make row 0 ask for e_3 and its far answer (chunk 2) is missed."""
    layer = one_hot_layer()
    with torch.no_grad():
        layer.routing_log = log = []
        layer(haystack([3, 0]))
    summary = summarize(routing_hits(log, QUERIES, SOURCES))
    assert summary["recall_far"] == 0.0 and summary["recall"] == 0.5


def test_prefill_pieces_and_decode_steps_log_the_same_routing():
    layer = one_hot_layer(top_k=2)
    x = haystack([2, 0])
    logs = {}
    with torch.no_grad():
        layer.routing_log = logs["parallel"] = []
        layer(x)
        layer.routing_log = logs["prefill"] = []
        _, state = layer(x[:, :10])
        layer(x[:, 10:], state)
        layer.routing_log = logs["steps"] = []
        state = layer.init_state(2)
        for t in range(x.shape[1]):
            _, state = layer.step(x[:, t], state)
    hits = {name: routing_hits(log, QUERIES, SOURCES) for name, log in logs.items()}
    for name in ("prefill", "steps"):
        for key in ("local", "found", "chance"):
            assert torch.equal(hits[name][key], hits["parallel"][key]), (name, key)
    assert hits["parallel"]["found"][0, 0].tolist() == [False, True]  # row 0's second pick is a tie: unchecked


def test_compressed_and_evicted_chunks_get_absolute_ids():
    # 7 chunks of 8 completed; a bank of 2 exact chunks (5, 6) and a pool of 2 compressed ones (3, 4): 3 evicted
    cfg = HydraConfig(
        vocab_size=16,
        d_model=D,
        n_layers=1,
        n_heads=1,
        layer_types=["retrieval"],
        retrieval_chunk_size=8,
        memory={"exact_window": 16, "compress_every": 2, "pool_size": 8},
    )
    state = dataclasses.replace(RetrievalAttention(cfg).init_state(1), pos=56)
    assert (state.n_pool, state.evicted, state.compressed) == (2, 3, 5)
    selected = torch.tensor([0, 1, 2, 3]).view(1, 1, 1, 4)
    entry = routing_entry(selected, torch.ones_like(selected, dtype=torch.bool), state, chunk_size=8)
    assert entry["chunks"].flatten().tolist() == [3, 4, 5, 6]
    assert entry["positions"].tolist() == [56] and entry["first_chunk"] == 3


def memory_layer(pool_size: int) -> RetrievalAttention:
    cfg = HydraConfig(
        vocab_size=16,
        d_model=D,
        n_layers=1,
        n_heads=1,
        layer_types=["retrieval"],
        retrieval_chunk_size=C,
        retrieval_top_k=2,
        memory={"exact_window": 2 * C, "compress_every": 2, "pool_size": pool_size},
    )
    return RetrievalAttention(cfg).eval()


def logged_steps(layer: RetrievalAttention, x: torch.Tensor) -> list:
    with torch.no_grad():
        layer.routing_log = log = []
        state = layer.init_state(x.shape[0])
        for t in range(x.shape[1]):
            _, state = layer.step(x[:, t], state)
        layer.routing_log = None
    return log


def test_decode_steps_log_absolute_ids_with_memory():
    """Steps read the bank and pool as rings: their log maps ring slots to the chunk ids a parallel call names
    (a pool of 8 compressed chunks: nothing evicted, so both may pick every chunk before the previous one)."""
    torch.manual_seed(0)
    layer = memory_layer(pool_size=4 * C)
    x = torch.randn(2, 10 * C, D)
    with torch.no_grad():
        layer.routing_log = parallel = []
        _, state = layer(x[:, : 7 * C + 1])
        layer(x[:, 7 * C + 1 :], state)
        layer.routing_log = None
    steps = logged_steps(layer, x)
    logs = {"parallel": parallel, "steps": steps}
    chunks = {name: torch.cat([e["chunks"] for e in log], dim=2) for name, log in logs.items()}
    valid = {name: torch.cat([e["valid"] for e in log], dim=2) for name, log in logs.items()}
    assert torch.equal(valid["steps"], valid["parallel"])
    assert torch.equal(chunks["steps"][valid["steps"]], chunks["parallel"][valid["parallel"]])


def test_decode_steps_never_log_evicted_chunks():
    torch.manual_seed(0)
    layer = memory_layer(pool_size=C)  # 2 compressed chunks: chunk c - 5 and older are evicted
    steps = logged_steps(layer, torch.randn(2, 10 * C, D))
    for entry in steps:
        own = int(entry["positions"][0]) // C
        assert entry["first_chunk"] == max(0, own - 4)
        picks = entry["chunks"][entry["valid"]]
        assert bool(((picks >= entry["first_chunk"]) & (picks <= own - 2)).all())
    assert steps[-1]["valid"].any()


def test_queries_outside_the_log_fail_clearly():
    layer = one_hot_layer()
    with torch.no_grad():
        layer.routing_log = log = []
        layer(haystack([2, 0])[:, :20])
    with pytest.raises(ValueError, match="no entry for query positions"):
        routing_hits(log, QUERIES, SOURCES)


def test_task_accuracy_reports_routing_recall_per_retrieval_layer():
    torch.manual_seed(0)
    cfg = HydraConfig(
        vocab_size=64,
        d_model=32,
        n_layers=3,
        n_heads=2,
        layer_types=["deltanet", "retrieval", "retrieval"],
        retrieval_chunk_size=8,
        retrieval_top_k=2,
        dn_chunk_size=16,
    )
    model = HydraLM(cfg).eval()
    task = RetrievalQA(seq_len=96, num_facts=4, num_queries=2, key_len=1, vocab=64)
    whole = task_accuracy(model, task, 6, batch_size=3, chunk_size=96, routing=True)
    pieces = task_accuracy(model, task, 6, batch_size=2, chunk_size=40, routing=True)  # chunked prefill
    assert set(whole["routing_recall"]) == {"layer1", "layer2"}
    assert whole["routing_recall"] == pieces["routing_recall"]
    layer = whole["routing_recall"]["layer1"]
    assert layer["queries"] == 12 and 0.0 <= layer["recall"] <= 1.0
    assert sum(b["queries"] for b in layer["by_depth"].values()) == 12
    # merge_hits + summarize over the raw log agree with the task's figure
    rows = [task.sample(i, "test", 0) for i in range(6)]
    ids = torch.stack([r["input_ids"] for r in rows])
    with torch.no_grad(), record_routing(model) as logs:
        model(ids)
    hits = routing_hits(logs[1], *(torch.stack([r[k] for r in rows]) for k in ("query_positions", "source_positions")))
    assert summarize(merge_hits([hits]))["recall"] == layer["recall"]


# -- the answer-chunk routing loss (HydraConfig.retrieval_routing_loss) ---------------------------------------


def test_routing_loss_is_the_cross_entropy_toward_the_answer_chunk():
    layer = one_hot_layer(top_k=1).train()
    x = haystack([2, 0])
    layer.routing_targets = (QUERIES, SOURCES)
    layer(x)
    # by hand: the query at 22 (chunk 5) scores the eligible chunks 0..3 by q . summary = [e_q . e_j]
    expected = []
    for query_token, answer_chunk in ((2, 2), (0, 1)):
        scores = torch.zeros(4)
        scores[query_token] = ROUTING_LOSS_TEMPERATURE  # cosine 1 with its own chunk, 0 with the others
        expected.append(-torch.log_softmax(scores, 0)[answer_chunk])
    assert torch.allclose(layer.routing_loss, torch.stack(expected).mean())  # the local query (21) is skipped


def test_routing_loss_gives_the_ranking_the_gradient_routing_cannot():
    """Without the loss no gradient reaches a chunk the router did not pick; with it the answer's chunk gets one."""
    layer = one_hot_layer(top_k=1).train()
    x = haystack([0, 0]).requires_grad_()
    layer(x)[0][:, 22].sum().backward()
    assert x.grad[:, 4:8].abs().sum() == 0  # chunk 1 (the answer of row 1) is not picked: no gradient at all
    x.grad = None
    layer.routing_targets = (QUERIES, SOURCES)
    layer(x)
    layer.routing_loss.backward()
    assert (x.grad[1, 4:8].abs().sum(-1) > 0).all()  # its keys now learn to be picked


def test_routing_loss_leaves_the_forward_unchanged_and_is_off_by_default():
    layer = one_hot_layer(top_k=1).train()
    x = haystack([2, 0])
    plain = layer(x)[0]
    assert layer.routing_loss is None and layer.routing_loss_weight == 0.0
    layer.routing_targets = (QUERIES, SOURCES)
    assert torch.equal(layer(x)[0], plain)
    with pytest.raises(ValueError, match="retrieval_routing_loss"):
        HydraConfig(retrieval_routing_loss=-1.0)


def test_routing_loss_applies_from_its_start_step():
    """retrieval_routing_loss_from=n: the trainer hands the layers the answers' positions only from step n on."""
    from types import SimpleNamespace

    from hydralm.training.lit_module import HydraLMModule

    model = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, layer_types=["swa", "retrieval"],
                 retrieval_routing_loss=1.0, retrieval_routing_loss_from=3)  # fmt: skip
    module = HydraLMModule(model=model, optimizer=dict(name="adamw", lr=1e-3))
    layer = module.net.blocks[1].mixer
    batch = {"query_positions": torch.tensor([[5]]), "source_positions": torch.tensor([[1]])}
    for step, expected in ((0, False), (2, False), (3, True), (9, True)):
        module._trainer = SimpleNamespace(global_step=step)  # LightningModule.global_step reads the trainer's
        module.on_train_batch_start(batch, 0)
        assert (layer.routing_targets is not None) is expected, step
    with pytest.raises(ValueError, match="retrieval_routing_loss_from"):
        HydraConfig(retrieval_routing_loss_from=-1)


@pytest.mark.parametrize("detach", [False, True])
def test_a_detached_routing_loss_moves_the_keys_and_not_the_attention_queries(detach):
    """retrieval_routing_loss_detach_query: the loss's gradient reaches the key projection only (the queries stay
    the attention's own); without it, the query projection too."""
    layer = one_hot_layer(top_k=1).train()
    layer.routing_loss_detach_query = detach
    layer.routing_targets = (QUERIES, SOURCES)
    layer(haystack([2, 0]))
    layer.routing_loss.backward()
    grad = layer.proj.qkv.weight.grad
    assert grad[D : 2 * D].abs().sum() > 0  # keys (summaries) learn either way
    assert (grad[:D].abs().sum() == 0) == detach
    assert HydraConfig(retrieval_routing_loss_detach_query=True).retrieval_routing_loss_detach_query
    with pytest.raises(ValueError, match="retrieval_routing_loss_detach_query"):
        HydraConfig(retrieval_routing_loss_detach_query="yes")
