"""Registry of aggregation strategies, by name, each with its settings and client hooks.

A strategy registers itself with :func:`register_strategy`; its class says everything
the rest of fedlora needs (as peft registers a method with its config class):

- ``config_class``: its typed, self-validating settings (:class:`strategies.config.StrategyConfig`);
  the run-config keys, defaults and help come from there, and nowhere else;
- ``client_hooks``: what it does on the client around local training
  (:class:`strategies.client_hooks.ClientHooks`).

Adding a strategy is one module that defines and registers its class, plus its import
in :mod:`strategies` (or a ``fedlora.strategies`` entry point, for a package of one's own).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from strategies.base import LoraStrategy
    from strategies.config import StrategyConfig

_REGISTRY: dict[str, type[LoraStrategy]] = {}
S = TypeVar("S", bound="type[LoraStrategy]")
ENTRY_POINT_GROUP = "fedlora.strategies"


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make a strategy available under ``name``.

    Raises:
        ValueError: the name is taken by another class, or the strategy's config shares
            a run-config key with another strategy's config (one key, one meaning).

    """

    def decorator(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy name '{name}' is already registered")
        owners = key_owners(cls.config_class)
        for other_name, other in _REGISTRY.items():
            if other_name == name:
                continue
            theirs = key_owners(other.config_class)
            clash = {k for k in owners.keys() & theirs.keys() if owners[k] is not theirs[k]}
            if clash:
                raise ValueError(
                    f"strategy '{name}': setting(s) {sorted(clash)} are already defined by "
                    f"'{other_name}'; a strategy reuses another's settings by subclassing its "
                    "config class")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorator


def key_owners(config_class: type) -> dict[str, type]:
    """Each run-config key of a config class and the class that declares its field.

    Two strategies may share a key only by inheriting it from the same class (HetLoRA
    and FlexLoRA both read the rank plan's settings from one base config).
    """
    from strategies.config import run_config_key

    owners: dict[str, type] = {}
    for klass in reversed(config_class.__mro__):
        for field_name in vars(klass).get("__annotations__", {}):
            owners[run_config_key(field_name)] = klass
    return owners


def _load_plugins() -> None:
    """Import the strategies other packages declare as ``fedlora.strategies`` entry points."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def available_strategies() -> list[str]:
    """Names of all registered strategies."""
    return sorted(_REGISTRY)


def get_strategy_class(name: str) -> type[LoraStrategy]:
    """Look up a strategy class by name.

    Raises:
        ValueError: for an unknown name, listing the known ones.

    """
    if name not in _REGISTRY:
        _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        from strategies.config import ConfigError

        known = ", ".join(available_strategies())
        raise ConfigError(f"unknown strategy '{name}'; known strategies: {known}") from None


def strategy_config(name: str, config: Any) -> StrategyConfig:
    """The typed settings of strategy ``name`` parsed from a flat run config."""
    return get_strategy_class(name).config_class.from_run_config(config)


def config_classes() -> dict[str, type[StrategyConfig]]:
    """Every registered strategy's config class, by strategy name."""
    return {name: cls.config_class for name, cls in sorted(_REGISTRY.items())}


def strategy_keys() -> set[str]:
    """Every run-config key that some registered strategy reads."""
    return set().union(*(c.keys() for c in config_classes().values()))
