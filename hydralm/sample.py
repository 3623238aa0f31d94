"""Sample from a trained model: ``python -m hydralm.sample ckpt=<.ckpt or folder> prompt="..."``.

The checkpoint is a Lightning ``.ckpt`` from ``train.py`` or a folder from ``python -m hydralm.export``
(conf/sample.yaml lists every option). A text ``prompt`` is tokenised (byte-level by default, see
``resolve_tokenizer_path``) and the decoded text is printed; ``prompt_ids=[...]`` skips the tokenizer
and prints the token ids. Either way the output is the prompt followed by the generated tokens, on stdout;
a one-line summary goes to stderr.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import List, Optional, Sequence

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydralm.data.tokenizer import TokenizerInfo, load_tokenizer
from hydralm.export import TOKENIZER_NAME, load_model


def parse_prompt_ids(value, vocab_size: int) -> List[int]:
    """``[1, 2, 3]`` (a list, or its text "1,2,3" / "[1,2,3]") -> ids, each in ``[0, vocab_size)``."""
    if isinstance(value, str):
        text = value.strip().strip("[]")
        try:
            value = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"prompt_ids={value!r} is invalid: expected a list of token ids, e.g. [1,2,3]") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple, ListConfig)):
        raise ValueError(f"prompt_ids={value!r} is invalid: expected a list of token ids, e.g. [1,2,3]")
    ids = list(value)
    if not ids:
        raise ValueError("prompt_ids=[] is invalid: the model needs at least one prompt token")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(
                f"prompt_ids={ids} is invalid: every id must be an integer in [0, vocab_size={vocab_size}) "
                f"(got {token!r})"
            )
    return ids


def quote_text_overrides(args: Sequence[str]) -> List[str]:
    """Command-line ``prompt=To be, or`` (what the shell passes for ``prompt="To be, or"``) becomes
    ``prompt='To be, or'``: Hydra would otherwise read the comma as a sweep (and brackets, parentheses,
    ``=`` as syntax) and refuse the command. A text prompt is always taken literally; a value already quoted
    for Hydra, and ``null``, pass unchanged."""
    quoted = []
    for arg in args:
        match = re.fullmatch(r"(\+{0,2}prompt)=(.*)", arg, flags=re.DOTALL)
        if match and match.group(2) and match.group(2) != "null" and match.group(2)[0] not in "'\"":
            # Hydra's quoted strings: \' is a quote; backslashes before a quote or at the end are doubled.
            value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, match.group(2)).replace("'", "\\'")
            arg = f"{match.group(1)}='{value}'"
        quoted.append(arg)
    return quoted


def prompt_text(value) -> str:
    """The text of ``prompt``; a list (``prompt=[To be,or]``, or one from a config file) is joined back with
    ", ", which is what its commas were."""
    if isinstance(value, (list, tuple, ListConfig)):
        return ", ".join(str(part) for part in value)
    return str(value)


def resolve_tokenizer_path(ckpt: str, tokenizer_path: Optional[str] = None) -> Optional[str]:
    """The tokenizer a text prompt uses: ``tokenizer_path`` if given; else ``<folder>/tokenizer.json`` for an
    exported folder that has one; else the training run's ``data.tokenizer_path`` (from
    ``<run>/.hydra/config.yaml`` when ``ckpt`` is ``<run>/checkpoints/*.ckpt``); else None (byte-level)."""
    if tokenizer_path is not None:
        return str(tokenizer_path)
    if os.path.isdir(ckpt):
        bundled = os.path.join(ckpt, TOKENIZER_NAME)
        return bundled if os.path.isfile(bundled) else None
    run_config = _run_config(ckpt)
    if run_config is None:
        return None
    try:
        path = OmegaConf.select(run_config, "data.tokenizer_path", default=None)
    except Exception as err:  # an interpolation that only resolves inside that run (e.g. ${hydra:...})
        print(
            f"warning: could not resolve data.tokenizer_path of the training run ({err}); "
            "using the byte-level tokenizer (pass tokenizer_path=... to choose)",
            file=sys.stderr,
        )
        return None
    return None if path is None else str(path)


def trained_on_synthetic_ids(ckpt: str) -> bool:
    """True when the training run's config says its data were synthetic token ids (no tokenizer)."""
    run_config = _run_config(ckpt) if os.path.isfile(ckpt) else None
    target = run_config.get("data", {}).get("_target_", "") if run_config is not None else ""
    return str(target).endswith("SyntheticDataModule")


def select_tokenizer(ckpt: str, tokenizer_path: Optional[str], vocab_size: int) -> TokenizerInfo:
    info = load_tokenizer(resolve_tokenizer_path(ckpt, tokenizer_path))
    if info.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {info.vocab_size} ids but the model's vocab_size is {vocab_size}: this model was "
            "not trained on this tokenizer's text; pass tokenizer_path=<its tokenizer.json> or prompt_ids=[...]"
        )
    return info


def encode_prompt(text: str, info: TokenizerInfo, add_bos: bool = True) -> List[int]:
    ids = info.tokenizer.encode(text).ids
    if add_bos and info.bos_id is not None:
        ids = [info.bos_id] + ids
    if not ids:
        raise ValueError('prompt="" is empty: give some text (or add_bos=true with a tokenizer that has <bos>)')
    return ids


def decode_ids(ids: Sequence[int], info: TokenizerInfo) -> str:
    """Text of ``ids`` without the special tokens (pad / bos / eos) and ids the tokenizer does not know."""
    special = {info.pad_id, info.bos_id, info.eos_id}
    return info.tokenizer.decode([i for i in ids if i not in special and i < info.vocab_size])


def sample(cfg: DictConfig) -> str:
    """Load, encode, generate, decode: returns what the command prints."""
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt is None:
        raise ValueError("ckpt=<path> is required: a .ckpt file from train.py or a folder from hydralm.export")
    ckpt = str(cfg.ckpt)
    if (cfg.prompt is None) == (cfg.prompt_ids is None):
        raise ValueError('give exactly one of prompt="some text" or prompt_ids=[1,2,3]')
    model = load_model(ckpt, map_location=cfg.device)
    vocab_size = model.cfg.vocab_size
    info = None
    if cfg.prompt is not None:
        if trained_on_synthetic_ids(ckpt):
            print(
                "warning: this checkpoint was trained on synthetic token ids; a text prompt means little to "
                "it (use prompt_ids=[...])",
                file=sys.stderr,
            )
        info = select_tokenizer(ckpt, cfg.tokenizer_path, vocab_size)
        prompt_ids = encode_prompt(prompt_text(cfg.prompt), info, cfg.add_bos)
    else:
        prompt_ids = parse_prompt_ids(cfg.prompt_ids, vocab_size)
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else (info.eos_id if info is not None else None)
    new_ids = generate_ids(model, prompt_ids, cfg, eos if cfg.stop_at_eos else None)
    print(
        f"# {len(new_ids)} new tokens after a {len(prompt_ids)}-token prompt from {ckpt}: {model.cfg.summary()}",
        file=sys.stderr,
    )
    if info is None:
        return json.dumps(prompt_ids + new_ids)
    return decode_ids(prompt_ids + new_ids, info)


def generate_ids(model, prompt_ids: List[int], cfg: DictConfig, eos_token_id: Optional[int]) -> List[int]:
    """The generated ids (prompt excluded, a final eos included) from ``hydralm.generation.generate``."""
    from hydralm.generation import generate  # imported here: only sampling needs it

    if cfg.max_new_tokens is None or int(cfg.max_new_tokens) < 0:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens!r} is invalid: expected an integer >= 0")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        out = generate(
            model,
            prompt,
            max_new_tokens=int(cfg.max_new_tokens),
            temperature=float(cfg.temperature),
            top_k=cfg.top_k or None,
            top_p=cfg.top_p,
            eos_token_id=eos_token_id,
            generator=generator,
            decoder=cfg.decoder,
        )
    return out[0, len(prompt_ids) :].tolist()


def _run_config(ckpt: str) -> Optional[DictConfig]:
    """``<run>/.hydra/config.yaml`` for ``ckpt = <run>/checkpoints/<name>.ckpt``, if that file exists."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), os.pardir, ".hydra", "config.yaml")
    return OmegaConf.load(path) if os.path.isfile(path) else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        text = sample(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *quote_text_overrides(sys.argv[1:])]
    main()
