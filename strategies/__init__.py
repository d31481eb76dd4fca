"""LoRA-aware aggregation: the adapter structure, the wire format, validation, strategies.

Depends on no other fedlora package. Importing it registers every strategy.
"""

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.base import LoraStrategy, RoundStats
from strategies.fedit import FedIT, fedit_aggregate
from strategies.fedsa import FedSALoRA
from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA, flexlora_aggregate
from strategies.hetlora import HetLoRA
from strategies.registry import available_strategies, get_strategy_class
from strategies.slora import SLoRA
from strategies.validation import ClientUpdate, UpdateRejected, UpdateSpec, validate_update

__all__ = [
    "ClientUpdate",
    "FFALoRA",
    "FedIT",
    "FedSALoRA",
    "FlexLoRA",
    "HetLoRA",
    "SLoRA",
    "LoraAdapter",
    "LoraFactors",
    "LoraStrategy",
    "RoundStats",
    "UpdateRejected",
    "UpdateSpec",
    "available_strategies",
    "fedit_aggregate",
    "flexlora_aggregate",
    "get_strategy_class",
    "validate_update",
]
