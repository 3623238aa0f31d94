"""HydraConfig: the single source of truth for a HydraLM model.

Every field is validated in ``__post_init__`` before any tensor exists; a bad value raises one
``ValueError`` that names the field, the value and what is allowed. ``HydraConfig()`` keeps the 0.2.0
semantics: Gated DeltaNet + sliding-window attention, no retrieval, no MTP head, no compressive memory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydralm.modules.registry import LAYER_TYPES, mixer_class

MEMORY_FIELDS = ("exact_window", "compress_every", "pool_size")  # required keys of HydraConfig.memory
MEMORY_OPTIONAL = {"loss_weight": 1.0}  # weight of the compressor's attention-reconstruction loss


@dataclass
class HydraConfig:
    vocab_size: int = 32000  # tokens in the embedding / LM head
    d_model: int = 768  # residual stream width
    n_layers: int = 12  # number of residual blocks
    n_heads: int = 12  # heads of every mixer (DeltaNet and attention queries)
    head_dim: Optional[int] = None  # per-head width; None -> d_model // n_heads
    n_kv_heads: Optional[int] = None  # key/value heads of attention layers (GQA); None -> n_heads
    mlp_mult: float = 8 / 3  # SwiGLU hidden = mlp_mult * d_model, rounded up to mlp_multiple_of
    mlp_multiple_of: int = 64  # rounding of the SwiGLU hidden size (hardware-friendly shapes)
    dn_short_conv_kernel: int = 4  # depthwise causal conv on q/k/v in DeltaNet layers
    dn_use_gate: bool = True  # output RMSNorm gated by SiLU(gate(x)) in DeltaNet layers
    dn_chunk_size: int = 64  # chunk length of the chunkwise (WY) DeltaNet training kernel
    dn_norm_qk: bool = True  # L2-normalise DeltaNet queries and keys (keeps the delta rule stable)
    swa_window: int = 512  # tokens a sliding-window query sees, itself included
    swa_every: int = 4  # every swa_every-th layer (1-based) is sliding-window attention; 0 = none
    rope_base: float = 10000.0  # rotary base of attention layers
    retrieval_every: int = 0  # every retrieval_every-th layer (not SWA) is retrieval attention; 0 = none
    retrieval_top_k: int = 8  # past chunks each token retrieves (beyond its local two chunks)
    retrieval_chunk_size: int = 64  # tokens per retrieval chunk (the unit that is summarised and retrieved)
    retrieval_routing_loss: float = 0.0  # weight of the answer-chunk routing loss on synthetic QA batches; 0 = off
    retrieval_routing_loss_from: int = 0  # training step from which that loss applies (reading first, then routing)
    retrieval_routing_loss_detach_query: bool = False  # true: that loss moves the keys only, not the attention queries
    mtp_depth: int = 0  # multi-token-prediction modules (0 = no MTP head)
    mtp_loss_weight: float = 0.1  # weight of the MTP auxiliary loss
    memory: Optional[dict] = None  # compressive memory: {exact_window, compress_every, pool_size[, loss_weight]}
    layer_types: Optional[list] = None  # explicit per-layer mixer list; None -> computed from swa/retrieval_every
    tie_embeddings: bool = True  # LM head shares the embedding matrix
    rms_eps: float = 1e-5  # epsilon of every RMSNorm
    initializer_range: float = 0.02  # std of the normal init of embeddings and projections

    # True when layer_types was derived from swa_every / retrieval_every (kept out of to_dict/from_dict
    # so a round trip or a replace() recomputes the schedule instead of freezing it).
    _auto_layer_types: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int(self, "vocab_size", minimum=2)
        _check_int(self, "d_model", minimum=1)
        _check_int(self, "n_layers", minimum=1)
        _check_int(self, "n_heads", minimum=1)
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                _fail("n_heads", self.n_heads, f"a divisor of d_model={self.d_model} (or set head_dim)")
        else:
            _check_int(self, "head_dim", minimum=1)
        if self.n_kv_heads is not None:
            _check_int(self, "n_kv_heads", minimum=1)
            if self.n_heads % self.n_kv_heads != 0:
                _fail("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}")
        _check_float(self, "mlp_mult", positive=True)
        _check_int(self, "mlp_multiple_of", minimum=1)
        _check_int(self, "dn_short_conv_kernel", minimum=1)
        _check_bool(self, "dn_use_gate")
        _check_int(self, "dn_chunk_size", minimum=1)
        _check_bool(self, "dn_norm_qk")
        _check_int(self, "swa_window", minimum=1)
        _check_int(self, "swa_every", minimum=0)
        _check_float(self, "rope_base", positive=True)
        _check_int(self, "retrieval_every", minimum=0)
        _check_int(self, "retrieval_top_k", minimum=1)
        _check_int(self, "retrieval_chunk_size", minimum=1)
        _check_float(self, "retrieval_routing_loss", positive=False)
        _check_int(self, "retrieval_routing_loss_from", minimum=0)
        _check_bool(self, "retrieval_routing_loss_detach_query")
        _check_int(self, "mtp_depth", minimum=0)
        _check_float(self, "mtp_loss_weight", positive=False)
        _check_bool(self, "tie_embeddings")
        _check_float(self, "rms_eps", positive=True)
        _check_float(self, "initializer_range", positive=True)
        self.memory = _check_memory(self.memory)

        if self.layer_types is None:
            self.layer_types = self.schedule(self.n_layers, self.swa_every, self.retrieval_every)
            self._auto_layer_types = True
        else:
            self.layer_types = _check_layer_types(self.layer_types, self.n_layers)
        for layer_type in dict.fromkeys(self.layer_types):  # what each layer type needs of the other fields
            check = getattr(mixer_class(layer_type), "check_config", None)
            if check is not None:
                check(self)

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def types(self) -> List[str]:
        """The per-layer mixer types (``layer_types`` after validation: never None)."""
        return list(self.layer_types or [])

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.mlp_mult * self.d_model)
        return -(-hidden // self.mlp_multiple_of) * self.mlp_multiple_of

    @staticmethod
    def schedule(n_layers: int, swa_every: int, retrieval_every: int) -> list:
        """The layer schedule (1-based position p): SWA where p % swa_every == 0, else retrieval where
        p % retrieval_every == 0, else Gated DeltaNet."""
        types = []
        for p in range(1, n_layers + 1):
            if swa_every > 0 and p % swa_every == 0:
                types.append("swa")
            elif retrieval_every > 0 and p % retrieval_every == 0:
                types.append("retrieval")
            else:
                types.append("deltanet")
        return types

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["layer_types"] = None if self._auto_layer_types else self.types
        out["memory"] = None if self.memory is None else dict(self.memory)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "HydraConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"HydraConfig: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> "HydraConfig":
        """A copy with some fields changed; a computed schedule is recomputed."""
        return HydraConfig.from_dict({**self.to_dict(), **changes})

    def summary(self) -> str:
        counts = {t: self.types.count(t) for t in LAYER_TYPES if t in self.types}
        mix = ", ".join(f"{n} {t}" for t, n in counts.items())
        extras = [f"top_k={self.retrieval_top_k}x{self.retrieval_chunk_size}"] if "retrieval" in counts else []
        if self.mtp_depth:
            extras.append(f"mtp_depth={self.mtp_depth}")
        if self.memory:
            extras.append("memory=" + "/".join(str(self.memory[k]) for k in MEMORY_FIELDS))
        return (
            f"HydraConfig(d_model={self.d_model}, n_layers={self.n_layers} [{mix}], heads={self.n_heads}"
            f"x{self.resolved_head_dim}, vocab={self.vocab_size}, window={self.swa_window}"
            + "".join(", " + e for e in extras)
            + ")"
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "HydraConfig":
        from hydralm.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is unknown; allowed: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# -- validation helpers --------------------------------------------------------------------------
def config_error(name: str, value: Any, allowed: str) -> ValueError:
    """The one error a bad field raises: it names the field, the value and what is allowed."""
    return ValueError(f"HydraConfig.{name}={value!r} is invalid: expected {allowed}")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise config_error(name, value, allowed)


def _check_int(cfg: HydraConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, f"an integer >= {minimum}")
    if value < minimum:
        _fail(name, value, f"an integer >= {minimum}")


def _check_float(cfg: HydraConfig, name: str, positive: bool) -> None:
    value = getattr(cfg, name)
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        _fail(name, value, f"a number {bound}")
    if value < 0 or (positive and value == 0):
        _fail(name, value, f"a number {bound}")


def _check_bool(cfg: HydraConfig, name: str) -> None:
    if not isinstance(getattr(cfg, name), bool):
        _fail(name, getattr(cfg, name), "true or false")


def _check_memory(memory: Any) -> Optional[dict]:
    if memory is None:
        return None
    allowed = list(MEMORY_FIELDS) + list(MEMORY_OPTIONAL)
    if not hasattr(memory, "keys"):
        _fail("memory", memory, f"None or a dict with keys {allowed}")
    memory = {str(k): memory[k] for k in memory.keys()}
    missing = [k for k in MEMORY_FIELDS if k not in memory]
    extra = [k for k in memory if k not in allowed]
    if missing or extra:
        _fail("memory", memory, f"a dict with the keys {list(MEMORY_FIELDS)} (optional: {list(MEMORY_OPTIONAL)})")
    for key in MEMORY_FIELDS:
        value = memory[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"memory.{key}", value, "an integer >= 1")
    weight = memory.setdefault("loss_weight", MEMORY_OPTIONAL["loss_weight"])
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        _fail("memory.loss_weight", weight, "a number >= 0")
    return memory


def _check_layer_types(layer_types: Any, n_layers: int) -> list:
    if isinstance(layer_types, str) or not hasattr(layer_types, "__len__"):
        _fail("layer_types", layer_types, f"None or a list of {n_layers} entries from {list(LAYER_TYPES)}")
    layer_types = [str(t) for t in layer_types]
    if len(layer_types) != n_layers:
        _fail("layer_types", layer_types, f"a list of n_layers={n_layers} entries")
    for t in layer_types:
        if t not in LAYER_TYPES:
            _fail("layer_types", layer_types, f"entries from {list(LAYER_TYPES)} (got {t!r})")
    return layer_types
