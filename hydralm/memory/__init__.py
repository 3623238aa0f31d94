"""Explicit memories that sit beside the model: the FactBank key-value store (docs/factbank.md)."""

from hydralm.memory.claims import measure_c3, measure_c9
from hydralm.memory.factbank import FactBank

__all__ = ["FactBank", "measure_c3", "measure_c9"]
