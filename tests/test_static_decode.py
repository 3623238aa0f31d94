"""StaticDecoder: fixed-shape decoding (compilable / graph-capturable) gives model.step's logits."""

import pytest
import torch
from helpers import static_model as small

from hydralm.state import clone_state, states_equal
from hydralm.static_decode import StaticDecoder


def decode_both(model, decoder, state, token, steps):
    worst = 0.0
    with torch.no_grad():
        for _ in range(steps):
            expected, state = model.step(token, state)
            got = decoder.step(token)
            worst = max(worst, float((got - expected).abs().max()))
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
            token = expected.argmax(-1)
    return worst, state


def test_static_decoding_gives_step_logits_through_compression_eviction_and_the_swa_ring():
    model = small()
    with torch.no_grad():
        out = model(torch.randint(0, 64, (2, 21)), return_state=True)  # 21: a chunk in progress at the start
    snapshot = clone_state(out["state"])
    decoder = StaticDecoder(model, out["state"])
    worst, state = decode_both(model, decoder, clone_state(out["state"]), out["logits"][:, -1].argmax(-1), 120)
    assert worst < 1e-5  # fp32; the same arithmetic up to masked-vs-sliced softmax
    assert decoder.state[2].counters() == state[2].counters() and state[2].evicted > 0
    assert states_equal(out["state"], snapshot)  # the decoder works on its own copies


def test_a_loaded_state_continues_like_a_fresh_decoder():
    model = small()
    with torch.no_grad():
        first = model(torch.randint(0, 64, (1, 30)), return_state=True)
        second = model(torch.randint(0, 64, (1, 45)), return_state=True)
    decoder = StaticDecoder(model, first["state"])
    decode_both(model, decoder, clone_state(first["state"]), first["logits"][:, -1].argmax(-1), 20)
    decoder.load(second["state"])
    assert decoder.pos == 45
    worst, _ = decode_both(model, decoder, clone_state(second["state"]), second["logits"][:, -1].argmax(-1), 30)
    assert worst < 1e-5
    other = small(memory=dict(exact_window=32, compress_every=4, pool_size=8))
    with torch.no_grad(), pytest.raises(ValueError, match="bank_k"):
        decoder.load(other(torch.randint(0, 64, (1, 30)), return_state=True)["state"])


@pytest.mark.slow
def test_compiled_static_decoding_gives_step_logits():
    model = small()
    with torch.no_grad():
        out = model(torch.randint(0, 64, (1, 21)), return_state=True)
    decoder = StaticDecoder(model, out["state"], compile=True)
    worst, _ = decode_both(model, decoder, clone_state(out["state"]), out["logits"][:, -1].argmax(-1), 40)
    assert worst < 1e-4  # fused reductions in the compiled graph; the C1 bound


def test_static_decoding_refuses_tokens_for_another_batch_size():
    model = small()
    decoder = StaticDecoder(model, model.init_state(2))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        decoder.step(torch.zeros(3, dtype=torch.long))


def test_static_decoding_refuses_layers_whose_state_grows():
    with pytest.raises(ValueError, match="HydraConfig.memory"):
        StaticDecoder(small(memory=None), small(memory=None).init_state(1))
    model = small(layer_types=("deltanet", "attention"))
    with pytest.raises(ValueError, match=r"\['attention'\]"):
        StaticDecoder(model, model.init_state(1))
