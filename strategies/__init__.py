"""LoRA-aware aggregation: the adapter structure, the wire format, validation, strategies.

Depends on no other fedlora package. Importing it registers every strategy.
"""

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.base import LoraStrategy, RoundStats
from strategies.fedit import FedIT, fedit_aggregate
from strategies.fedsa import FedSALoRA
from strategies.ffa import FFALoRA
from strategies.registry import available_strategies, get_strategy_class
from strategies.validation import ClientUpdate, UpdateRejected, UpdateSpec, validate_update

__all__ = [
    "ClientUpdate",
    "FFALoRA",
    "FedIT",
    "FedSALoRA",
    "LoraAdapter",
    "LoraFactors",
    "LoraStrategy",
    "RoundStats",
    "UpdateRejected",
    "UpdateSpec",
    "available_strategies",
    "fedit_aggregate",
    "get_strategy_class",
    "validate_update",
]
