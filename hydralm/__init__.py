"""HydraLM: a hybrid sub-quadratic language model (Gated DeltaNet + sliding-window + retrieval attention)."""

from hydralm.baselines.dense_transformer import DenseTransformer
from hydralm.config import PRESETS, HydraConfig
from hydralm.export import export_checkpoint, load_from_lightning_checkpoint, load_model, load_pretrained, save_pretrained
from hydralm.generation import generate
from hydralm.memory import FactBank
from hydralm.model import HydraLM
from hydralm.modules.compressive_memory import CompressiveMemory
from hydralm.sampling import filtered_probs, sample_next
from hydralm.spec_decoding import SpeculativeStats, speculative_generate
from hydralm.state import clone_state, state_bytes
from hydralm.static_decode import StaticDecoder
from hydralm.streaming import StreamingEngine, StreamStats

__version__ = "0.3.0"

__all__ = [
    "HydraConfig", "HydraLM", "DenseTransformer", "CompressiveMemory", "PRESETS",
    "generate", "speculative_generate", "SpeculativeStats", "StreamingEngine", "StreamStats", "StaticDecoder",
    "sample_next", "filtered_probs", "clone_state", "state_bytes", "FactBank",
    "save_pretrained", "load_pretrained", "load_from_lightning_checkpoint", "load_model", "export_checkpoint",
    "__version__",
]
