"""HydraLM: a hybrid sub-quadratic language model (Gated DeltaNet + sliding-window + retrieval attention)."""

from hydralm.baselines.dense_transformer import DenseTransformer
from hydralm.config import PRESETS, HydraConfig
from hydralm.model import HydraLM
from hydralm.modules.compressive_memory import CompressiveMemory

__version__ = "0.3.0"

__all__ = ["HydraConfig", "HydraLM", "DenseTransformer", "CompressiveMemory", "PRESETS", "__version__"]
