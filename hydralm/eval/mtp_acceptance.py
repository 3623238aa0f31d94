"""How often the MTP head's drafts would be accepted, per draft depth, on held-out text (the test split of a
text DataModule): what MTP self-draft speculative decoding gains from a checkpoint.

For depth i (1-based; module i drafts the token i + 1 ahead of the last fed position):
  teacher-forced, one forward per batch (the training form: modules read the text's own tokens):
    greedy_match        P[argmax q_i = argmax p]: module i's greedy draft is the target's greedy token there
    sampled_acceptance  E[sum_x min(p(x), q_i(x))] = 1 - TV(p, q_i) at temperature 1: the probability that
                        speculative sampling accepts the draft
  decoding, ``speculative_generate`` (greedy, k = mtp_depth) from held-out prompts:
    acceptance_by_depth accepted / verified at each draft position: the rate self-drafting actually sees (the
                        i-th draft counts as accepted only when every draft before it was)
"""

from typing import Dict, List

import torch


@torch.no_grad()
def mtp_acceptance(
    model,
    datamodule,
    max_batches: int = 16,
    prompts: int = 8,
    prompt_len: int = 256,
    new_tokens: int = 128,
    decoder: str = "auto",
) -> Dict:
    depth = model.cfg.mtp_depth
    if depth == 0 or model.mtp is None:
        raise ValueError("eval=mtp_acceptance needs a checkpoint with an MTP head (model.mtp_depth > 0), got 0")
    for name, value in (("prompts", prompts), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"eval.{name}={value!r} is invalid: expected an integer >= 1")
    datamodule.setup("test")
    device = next(model.parameters()).device
    greedy, sampled, counts = [0.0] * depth, [0.0] * depth, [0] * depth
    prompt_rows: List[torch.Tensor] = []
    for b, batch in enumerate(datamodule.test_dataloader()):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        if max_batches is None or b < max_batches:
            _teacher_forced(model, ids, labels, greedy, sampled, counts)
        for row, row_labels in zip(ids, labels):
            if len(prompt_rows) < prompts and int((row_labels != -100).sum()) >= prompt_len:
                prompt_rows.append(row[:prompt_len])
        if (max_batches is not None and b + 1 >= max_batches) and len(prompt_rows) >= prompts:
            break
    if not any(counts):
        raise ValueError("mtp_acceptance: the test split has no positions to score (rows shorter than mtp_depth + 1)")
    report: Dict = {
        "mtp_depth": depth,
        "teacher_forced": {
            "greedy_match": [g / max(n, 1) for g, n in zip(greedy, counts)],
            "sampled_acceptance": [s / max(n, 1) for s, n in zip(sampled, counts)],
            "positions": counts,
        },
    }
    report["decoding"] = _decoding(model, prompt_rows, new_tokens, decoder, prompt_len)
    return report


def _teacher_forced(model, ids, labels, greedy, sampled, counts) -> None:
    """Accumulate, per depth, greedy matches and sum_x min(p, q) over the positions whose target is a real token."""
    out = model(ids, compute_mtp=True)
    logits = out["logits"].float()
    for i, mtp_logits in enumerate(out["mtp_logits"], start=1):
        # module i's row t drafts the token that the main head predicts at position t + i
        target = logits[:, i:]
        valid = labels[:, i:] != -100
        draft = mtp_logits.float()
        greedy[i - 1] += float(((draft.argmax(-1) == target.argmax(-1)) & valid).sum())
        overlap = torch.minimum(target.softmax(-1), draft.softmax(-1)).sum(-1)
        sampled[i - 1] += float((overlap * valid).sum())
        counts[i - 1] += int(valid.sum())


def _decoding(model, prompt_rows: List[torch.Tensor], new_tokens: int, decoder: str, prompt_len: int) -> Dict:
    """Greedy self-draft speculative decoding from each prompt; per-depth acceptance over all of them."""
    from hydralm.spec_decoding import speculative_generate

    depth = model.cfg.mtp_depth
    proposed, accepted, rounds, emitted = [0] * depth, [0] * depth, 0, 0
    for prompt in prompt_rows:
        _, stats = speculative_generate(model, None, prompt, new_tokens, k=depth, temperature=0, decoder=decoder)
        proposed = [a + b for a, b in zip(proposed, stats.proposed_by_depth)]
        accepted = [a + b for a, b in zip(accepted, stats.accepted_by_depth)]
        rounds, emitted = rounds + stats.rounds, emitted + stats.accepted + stats.rounds
    return {
        "prompts": len(prompt_rows),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "acceptance_by_depth": [a / p if p else None for a, p in zip(accepted, proposed)],
        "tokens_per_round": emitted / rounds if rounds else None,
        "rounds": rounds,
    }
