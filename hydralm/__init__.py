"""HydraLM: a hybrid sub-quadratic language model (Gated DeltaNet + sliding-window + retrieval attention)."""

from hydralm.baselines.dense_transformer import DenseTransformer
from hydralm.config import HydraConfig
from hydralm.factbank import FactBank
from hydralm.generation import generate
from hydralm.model import HydraLM
from hydralm.modules.compressive_memory import CompressiveMemory
from hydralm.spec_decoding import SpeculativeStats, speculative_generate
from hydralm.state import clone_state, state_bytes
from hydralm.static_decode import StaticDecoder
from hydralm.streaming import StreamingEngine, StreamStats
from hydralm.token_sampling import filtered_probs, sample_next

__version__ = "0.3.0"


# Imported on first use, so `python -m hydralm.presets` / `python -m hydralm.export` do not find their module
# already imported (runpy warns about that, and the module would exist twice).
_LAZY = {
    "PRESETS": "hydralm.presets",
    "save_pretrained": "hydralm.export",
    "load_pretrained": "hydralm.export",
    "load_from_lightning_checkpoint": "hydralm.export",
    "load_model": "hydralm.export",
    "export_checkpoint": "hydralm.export",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hydralm' has no attribute {name!r}")


__all__ = [
    "HydraConfig",
    "HydraLM",
    "DenseTransformer",
    "CompressiveMemory",
    "PRESETS",
    "generate",
    "speculative_generate",
    "SpeculativeStats",
    "StreamingEngine",
    "StreamStats",
    "StaticDecoder",
    "sample_next",
    "filtered_probs",
    "clone_state",
    "state_bytes",
    "FactBank",
    "save_pretrained",
    "load_pretrained",
    "load_from_lightning_checkpoint",
    "load_model",
    "export_checkpoint",
    "__version__",
]
