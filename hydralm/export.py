"""Checkpoint export: a Hugging Face style folder (``config.json`` + ``model.safetensors``) and back.

    folder/config.json          HydraConfig.to_dict() plus "architecture": "hydra" | "dense"
    folder/model.safetensors    the model's state_dict; a tied LM head is stored once (as embed.weight)

``load_pretrained`` rebuilds the model from ``config.json`` and loads the weights exactly (same tensors,
same dtype, same logits). Lightning checkpoints written by ``train.py`` load directly with
``load_from_lightning_checkpoint`` (``torch.load(weights_only=True)``: nothing in the file is executed).

Command line (thin wrapper over ``export_checkpoint``)::

    python -m hydralm.export --ckpt logs/train/runs/<run>/checkpoints/last.ckpt --out exported/<name>
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _load_safetensors
from safetensors.torch import save_model as _save_safetensors

from hydralm.baselines.dense_transformer import DenseTransformer
from hydralm.config import HydraConfig
from hydralm.model import HydraLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
ARCHITECTURES = {"hydra": HydraLM, "dense": DenseTransformer}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

PathLike = Union[str, os.PathLike]


def architecture_of(model: HydraLM) -> str:
    """``"dense"`` for a DenseTransformer, ``"hydra"`` for any other HydraLM."""
    if isinstance(model, DenseTransformer):
        return "dense"
    if isinstance(model, HydraLM):
        return "hydra"
    raise TypeError(f"expected a HydraLM or DenseTransformer, got {type(model).__name__}")


def save_pretrained(model: HydraLM, folder: PathLike, tokenizer_path: Optional[PathLike] = None) -> str:
    """Write ``config.json`` and ``model.safetensors`` (and a copy of ``tokenizer_path`` as ``tokenizer.json``)
    into ``folder`` (created if needed); returns the folder. A LightningModule holding the model as ``.net``
    is accepted too. Each file is written to a temporary name and renamed, so a crash never leaves a
    half-written file under the final name."""
    if not isinstance(model, HydraLM) and isinstance(getattr(model, "net", None), HydraLM):
        model = model.net
    architecture = architecture_of(model)
    config = {**model.cfg.to_dict(), "architecture": architecture}
    if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"tokenizer_path={os.fspath(tokenizer_path)!r} does not exist")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    _atomic_write(os.path.join(folder, CONFIG_NAME), lambda tmp: _write_text(tmp, json.dumps(config, indent=2) + "\n"))
    weights = os.path.join(folder, WEIGHTS_NAME)
    _atomic_write(weights, lambda tmp: _save_safetensors(model, tmp, metadata={"format": "pt"}))
    if tokenizer_path is not None:
        with open(tokenizer_path, "rb") as src:
            data = src.read()
        _atomic_write(os.path.join(folder, TOKENIZER_NAME), lambda tmp: _write_bytes(tmp, data))
    return folder


def load_config(folder: PathLike) -> tuple:
    """``(HydraConfig, architecture)`` from ``folder/config.json``; unknown fields raise ``ValueError``."""
    folder = _existing_folder(folder)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        checkpoints = checkpoint_files(folder)
        hint = f"; it holds checkpoints, give one of them: {', '.join(checkpoints)}" if checkpoints else ""
        raise FileNotFoundError(f"{path} does not exist: {folder!r} is not a folder written by save_pretrained{hint}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of HydraConfig fields, got {type(data).__name__}")
    architecture = data.pop("architecture", "hydra")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture={architecture!r} is unknown; allowed: {list(ARCHITECTURES)}")
    try:
        cfg = HydraConfig.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return cfg, architecture


def load_pretrained(folder: PathLike, map_location: Union[str, torch.device] = "cpu") -> HydraLM:
    """The model saved by ``save_pretrained``, in eval mode on ``map_location``, in the stored dtype."""
    cfg, architecture = load_config(folder)
    weights = os.path.join(os.fspath(folder), WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} does not exist: the folder has a config but no weights")
    model = ARCHITECTURES[architecture](cfg)
    try:
        with safe_open(weights, framework="pt") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from None
    floating = {_SAFETENSORS_DTYPES[d] for d in dtypes if d in _SAFETENSORS_DTYPES}
    if len(floating) == 1:  # the common case: cast first so loading copies bit-exactly
        model.to(floating.pop())
    try:
        _load_safetensors(model, weights, strict=True, device="cpu")
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match config.json ({cfg.summary()}): {err}") from None
    return model.to(map_location).eval()


def load_from_lightning_checkpoint(ckpt_path: PathLike, map_location: Union[str, torch.device] = "cpu") -> HydraLM:
    """The model of a ``train.py`` checkpoint (HydraLMModule: ``hyper_parameters['model']`` holds the
    HydraConfig fields, ``state_dict`` the weights under ``net.``), in eval mode on ``map_location``."""
    checkpoint = read_checkpoint(ckpt_path)
    hparams, state = checkpoint["hyper_parameters"], checkpoint["state_dict"]
    architecture = hparams.get("architecture", "hydra")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{ckpt_path}: architecture={architecture!r} is unknown; allowed: {list(ARCHITECTURES)}")
    try:
        cfg = HydraConfig.from_dict(dict(hparams["model"]))
    except ValueError as err:
        raise ValueError(f"{ckpt_path}: hyper_parameters['model'] is not a valid HydraConfig: {err}") from None
    # Only the network: metric states and a torch.compile wrapper (``_compiled_forward._orig_mod.*``) are not it.
    net_state = {name[len("net.") :]: tensor for name, tensor in state.items() if name.startswith("net.")}
    model = ARCHITECTURES[architecture](cfg)
    floating = {t.dtype for t in net_state.values() if t.is_floating_point()}
    if len(floating) == 1:
        model.to(floating.pop())
    try:
        model.load_state_dict(net_state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{ckpt_path}: the weights do not match its own config ({cfg.summary()}): {err}") from None
    return model.to(map_location).eval()


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> HydraLM:
    """A folder from ``save_pretrained`` or a Lightning ``.ckpt`` file, whichever ``path`` is."""
    if os.path.isdir(path):
        return load_pretrained(path, map_location)
    if os.path.isfile(path):
        return load_from_lightning_checkpoint(path, map_location)
    raise FileNotFoundError(f"{os.fspath(path)!r} does not exist (expected a .ckpt file or an exported folder)")


def export_checkpoint(ckpt_path: PathLike, folder: PathLike, tokenizer_path: Optional[PathLike] = None) -> str:
    """Lightning checkpoint -> exported folder; returns the folder."""
    return save_pretrained(load_from_lightning_checkpoint(ckpt_path), folder, tokenizer_path=tokenizer_path)


# -- helpers -------------------------------------------------------------------------------------
def _existing_folder(folder: PathLike) -> str:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(f"{folder!r} {what} (expected a folder written by save_pretrained)")
    return folder


def checkpoint_files(folder: PathLike, limit: int = 10) -> list:
    """Up to ``limit`` ``.ckpt`` files under ``folder`` (recursively), newest first."""
    found = []
    for root, _, names in os.walk(os.fspath(folder)):
        found += [os.path.join(root, n) for n in names if n.endswith(".ckpt")]
    return sorted(found, key=os.path.getmtime, reverse=True)[:limit]


def not_a_checkpoint_file(path: PathLike, field: str = "ckpt_path") -> str:
    """The message for a folder given where a checkpoint file is expected: which .ckpt files it holds."""
    files = checkpoint_files(path)
    listing = f"its .ckpt files, newest first: {', '.join(files)}" if files else "it holds no .ckpt file"
    return f"{field}={os.fspath(path)!r} is a directory, not a checkpoint file; {listing}"


def read_checkpoint(ckpt_path: PathLike, mmap: bool = False) -> dict:
    """A ``train.py`` checkpoint, or one ValueError saying why the file is not one (truncated, not a torch
    file, foreign objects, not HydraLM's). ``mmap=True`` checks a file without reading its tensors."""
    path = os.fspath(ckpt_path)
    if os.path.isdir(path):
        raise IsADirectoryError(not_a_checkpoint_file(path, "checkpoint"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text:  # an object weights_only refuses: it is never executed
            detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
            raise ValueError(
                f"{path} is not a HydraLM Lightning checkpoint: it holds objects that torch.load(weights_only=True) "
                f"refuses to load ({detail or 'see torch.load'})"
            ) from None
        raise ValueError(f"{path} is not a readable torch checkpoint ({text})") from None
    except Exception as err:  # garbage bytes surface as KeyError, EOFError, RuntimeError ... from the unpickler
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} is not a HydraLM Lightning checkpoint: expected 'hyper_parameters' with a 'model' dict of "
            "HydraConfig fields and a 'state_dict' (as written by train.py)"
        )
    return checkpoint


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; exported folders are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hydralm.export", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train.py (.ckpt)")
    parser.add_argument("--out", required=True, help="folder to write config.json + model.safetensors into")
    parser.add_argument("--tokenizer", default=None, help="tokenizers JSON to copy in as tokenizer.json (optional)")
    args = parser.parse_args(argv)
    try:
        folder = export_checkpoint(args.ckpt, args.out, tokenizer_path=args.tokenizer)
    except (FileNotFoundError, IsADirectoryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg, architecture = load_config(folder)
    print(f"exported {architecture} model {cfg.summary()} to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
