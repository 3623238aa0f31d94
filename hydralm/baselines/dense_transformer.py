"""Dense Transformer baseline: RoPE + causal SDPA + SwiGLU, with HydraLM's exact interface.

It is HydraLM with every layer set to full causal attention, so comparisons change the mixer and nothing
else (same embedding, norms, MLP, init, head, decoding API).
"""

from hydralm.config import HydraConfig
from hydralm.model import HydraLM


class DenseTransformer(HydraLM):
    def __init__(self, cfg: HydraConfig):
        super().__init__(cfg.replace(layer_types=["attention"] * cfg.n_layers, retrieval_every=0))
