"""LoRA-aware aggregation: the adapter structure, the codec, validation, strategies.

Depends on no other fedlora package. Importing it imports every module of the package,
so every strategy defined in one registers itself: a new strategy is one module here
(or a ``fedlora.strategies`` entry point in a package of one's own).
"""

import importlib
import pkgutil

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.base import LoraStrategy
from strategies.config import StrategyConfig
from strategies.errors import AggregationError, UpdateRejected
from strategies.fedit import FedIT, fedit_aggregate
from strategies.fedsa import FedSALoRA
from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA, flexlora_aggregate
from strategies.hetlora import HetLoRA
from strategies.registry import available_strategies, get_strategy_class
from strategies.round_stats import RoundStats
from strategies.slora import SLoRA
from strategies.validation import ClientUpdate, UpdateSpec, validate_update

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AggregationError",
    "ClientUpdate",
    "FFALoRA",
    "FedIT",
    "FedSALoRA",
    "FlexLoRA",
    "HetLoRA",
    "LoraAdapter",
    "LoraFactors",
    "LoraStrategy",
    "RoundStats",
    "SLoRA",
    "StrategyConfig",
    "UpdateRejected",
    "UpdateSpec",
    "available_strategies",
    "fedit_aggregate",
    "flexlora_aggregate",
    "get_strategy_class",
    "validate_update",
]
