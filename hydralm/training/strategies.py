"""Distributed strategies that need more than a YAML node: FSDP's wrapping and checkpointing policies are
sets of module classes, which a config can only name as strings."""

from typing import Iterable, Optional

from hydra.utils import get_class
from lightning.pytorch.strategies import FSDPStrategy


def _classes(field: str, paths: Iterable[str]) -> set:
    classes = set()
    for path in paths:
        try:
            classes.add(get_class(path))
        except (ImportError, ValueError) as err:
            raise ValueError(f"trainer.strategy.{field}: {path!r} is not an importable class ({err})") from None
    return classes


def fsdp_strategy(
    wrap: Iterable[str] = ("hydralm.model.Block",),
    activation_checkpointing: bool = False,
    checkpoint_modules: Optional[Iterable[str]] = None,
    **kwargs,
) -> FSDPStrategy:
    """FSDPStrategy with one FSDP unit per module of the classes in `wrap` (class paths), and activation
    checkpointing of `checkpoint_modules` (default: the wrapped classes) when `activation_checkpointing`.
    Every other keyword goes to FSDPStrategy (sharding_strategy, state_dict_type, cpu_offload, ...)."""
    units = _classes("wrap", wrap)
    checkpointed = _classes("checkpoint_modules", checkpoint_modules) if checkpoint_modules else units
    return FSDPStrategy(
        auto_wrap_policy=units,
        activation_checkpointing_policy=checkpointed if activation_checkpointing else None,
        **kwargs,
    )
