"""Registry of aggregation strategies, by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from strategies.base import LoraStrategy

_REGISTRY: dict[str, type[LoraStrategy]] = {}
S = TypeVar("S", bound="type[LoraStrategy]")


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make a strategy available under ``name``."""

    def decorator(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy name '{name}' is already registered")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorator


def available_strategies() -> list[str]:
    """Names of all registered strategies."""
    return sorted(_REGISTRY)


def get_strategy_class(name: str) -> type[LoraStrategy]:
    """Look up a strategy class by name.

    Raises:
        ValueError: for an unknown name, listing the known ones.

    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_strategies())
        raise ValueError(f"unknown strategy '{name}'; known strategies: {known}") from None
