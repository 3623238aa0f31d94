"""The layer types: one line per mixer, read by config validation, the model, decoding, the state utilities and
the tests. Adding a layer type is one new file under hydralm/modules/ (a class that follows the contract in
mixer.py) plus one line here; docs/architecture.md ("Adding a layer type") walks through it.

Entries name the class by import path, so hydralm.config can list the types without importing the modules
(which import the config themselves).
"""

import importlib
from typing import Dict, Type

MIXERS: Dict[str, str] = {
    "deltanet": "hydralm.modules.gated_deltanet:GatedDeltaNet",
    "swa": "hydralm.modules.sliding_window:SlidingWindowAttention",
    "retrieval": "hydralm.modules.retrieval_attention:RetrievalAttention",
    "attention": "hydralm.modules.full_attention:FullAttention",
}
LAYER_TYPES = tuple(MIXERS)


def mixer_class(layer_type: str) -> Type:
    """The mixer class of a layer type (a ValueError names the known ones)."""
    if layer_type not in MIXERS:
        raise ValueError(f"layer type {layer_type!r} is unknown; known: {list(LAYER_TYPES)}")
    module, name = MIXERS[layer_type].split(":")
    return getattr(importlib.import_module(module), name)
