"""FactBank: an explicit key-value store that sits beside the model (docs/factbank.md).

Its claims (C3 round trip, C9 precision after rotations) are measured in hydralm/eval/factbank_claims.py.
"""

from hydralm.factbank.factbank import FactBank

__all__ = ["FactBank"]
