"""Speculative verification on a StaticDecoder with the decode kernels (HYDRALM_DECODE_VERIFY=kernels,
HYDRALM_RETRIEVAL_DECODE=triton, HYDRALM_SWA_DECODE=triton): the retrieval and sliding-window layers verify T
tokens as T in-place steps of the step's kernels and write their slots back, and the retrieval layer's commit
replays the kept tokens with the ring-update kernel. So a verify's logits are the decode steps' bit for bit, the
state does not move, and a commit leaves the state the steps leave: speculative decoding matches greedy decoding
token for token. Off GPU the kernels run in Triton's CPU interpreter (conftest.py)."""

import pytest
import torch

from hydralm import HydraConfig, HydraLM
from hydralm.kernels.triton_common import triton_available
from hydralm.state import clone_state, states_equal
from hydralm.static_decode import StaticDecoder

pytestmark = pytest.mark.skipif(not triton_available(), reason="the `triton` package is a dev dependency")

MEMORY = {"exact_window": 32, "compress_every": 4, "pool_size": 12}  # 4 exact chunks of 8, 6 pooled chunks of 2
# every decode kernel, as auto picks them on CUDA: with the PyTorch paths on a CPU the one- and T-token forms of a
# norm or a matmul need not round alike
KERNELS = {
    "HYDRALM_RETRIEVAL_DECODE": "triton",
    "HYDRALM_SWA_DECODE": "triton",
    "HYDRALM_DECODE": "fused",
    "HYDRALM_DECODE_MANY": "fused",
    "HYDRALM_DECODE_LINEAR": "fused",
    "HYDRALM_DECODE_VERIFY": "kernels",
}


def _model():
    torch.manual_seed(0)
    fields = dict(vocab_size=64, d_model=64, n_layers=3, n_heads=2, swa_window=8)
    fields.update(retrieval_chunk_size=8, retrieval_top_k=2)
    model = HydraLM(HydraConfig(**fields, layer_types=["retrieval", "swa", "deltanet"], memory=MEMORY)).eval()
    with torch.no_grad():
        model.blocks[0].mixer.memory.pool_query.normal_()  # zero at init: plain mean pooling
    return model


def _rounds(rows, monkeypatch, kept_counts=(1, 3, 2)):
    """Verify 3 tokens, commit the first kept_counts[i] of them; against steps of a second decoder from the same
    state. Yields (verify logits, steps' logits, state unmoved by verify, committed state equal to the steps')."""
    for name, value in KERNELS.items():
        monkeypatch.setenv(name, value)
    model = _model()
    with torch.no_grad():
        state = model(torch.randint(0, 64, (rows, 37)), return_state=True)["state"]
        decoder, steps = StaticDecoder(model, state), StaticDecoder(model, state)
        for kept in kept_counts:  # from position 37: chunk 4 completes at 39, chunk 0 leaves into the pool
            before = clone_state(decoder.state)
            ids = torch.randint(0, 64, (rows, 3))
            verified = decoder.verify(ids)[0].clone()
            unmoved = states_equal(decoder.state, before)
            stepped = []
            steps.load(before)
            for j in range(3):
                stepped.append(steps.step(ids[:, j]).clone())
            decoder.commit(kept)
            steps.load(before)
            for j in range(kept):
                steps.step(ids[:, j])
            yield verified, torch.stack(stepped, 1), unmoved, states_equal(decoder.state, steps.state)


def test_verify_and_commit_are_the_decode_steps_bit_for_bit(monkeypatch):
    for verified, stepped, unmoved, committed in _rounds(2, monkeypatch):
        assert torch.equal(verified, stepped)
        assert unmoved and committed


def test_the_check_fails_when_verify_does_not_restore_the_bank(monkeypatch):
    """Sabotage: a verify that saves only the chunk in progress leaves a completed chunk in the bank (and the pool
    written): caught by the state check."""
    from hydralm.modules.retrieval_attention import RetrievalAttention

    slots = RetrievalAttention._verify_slots
    monkeypatch.setattr(RetrievalAttention, "_verify_slots", lambda self, st: slots(self, st)[:2])
    assert not all(unmoved for _, _, unmoved, _ in _rounds(1, monkeypatch, kept_counts=(3,)))  # 37 .. 39
