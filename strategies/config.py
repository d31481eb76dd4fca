"""Typed settings read from Flower's flat run config: the one parser every settings class uses.

A settings class is a frozen dataclass whose fields are run-config keys with ``_``
written as ``-`` (``hetlora_lambda`` is ``hetlora-lambda``). It validates itself in
``__post_init__`` with messages that name the setting. A field's documentation is its
``help`` metadata (:func:`setting`), which the settings reference and the
``[tool.flwr.app.config]`` table are checked against.

:class:`StrategyConfig` is the base of a strategy's own settings: a strategy registers
its config class with itself (:func:`strategies.registry.register_strategy`), so its
defaults, types and checks are written once, here, and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting with a bad value, or one that does not exist: the message names it."""


def setting(default: Any, help: str) -> Any:  # noqa: A002 - the name reads well at the call
    """A settings field with its default and one line of documentation."""
    return dataclasses.field(default=default, metadata={"help": help})


def run_config_key(field_name: str) -> str:
    """The run-config key of a dataclass field."""
    return field_name.replace("_", "-")


def settings_keys(cls: type) -> set[str]:
    """Every run-config key a settings dataclass reads."""
    return {run_config_key(f.name) for f in dataclasses.fields(cls)}


def settings_help(cls: type) -> dict[str, tuple[Any, str]]:
    """``{key: (default, help)}`` for every field of a settings dataclass."""
    return {run_config_key(f.name): (f.default, f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)}


def from_run_config(cls: type[T], config: Mapping[str, Any]) -> T:
    """Build a settings dataclass from the keys of a flat run config that it knows.

    Values are converted to the field's declared type (``int``, ``float``, ``str``,
    ``bool``); keys the dataclass does not know are ignored here (the caller checks
    for unknown keys across all settings).
    """
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = run_config_key(f.name)
        if key in config:
            kwargs[f.name] = convert(key, config[key], f.type)
    return cls(**kwargs)


def to_run_config(settings: Any) -> dict[str, Any]:
    """The flat run-config view of a settings dataclass."""
    return {run_config_key(k): v for k, v in dataclasses.asdict(settings).items()}


def convert(key: str, value: Any, type_name: Any) -> Any:
    """``value`` as the type a field declares (by its annotation's name).

    Raises:
        ValueError: the value does not convert, naming ``key``.

    """
    target = {"int": int, "float": float, "str": str, "bool": bool}.get(str(type_name))
    if target is None:
        return value
    if target is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{key} must be true or false, got '{value}'")
        return value.lower() in ("true", "1")
    if target is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{key} must be a whole number, got {value}")
    try:
        return target(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be of type {target.__name__}, got {value!r}") from None


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class StrategyConfig:
    """A strategy's own settings (none here); subclasses add fields with :func:`setting`.

    ``check_run`` checks them against the run's federation (rounds, rank), which a
    field's own check cannot see.
    """

    @classmethod
    def from_run_config(cls: type[T], config: Mapping[str, Any]) -> T:
        """Parse this config's keys from a flat run config (other keys are ignored)."""
        return from_run_config(cls, config)

    @classmethod
    def keys(cls) -> set[str]:
        """The run-config keys of this config."""
        return settings_keys(cls)

    def to_run_config(self) -> dict[str, Any]:
        """The flat run-config view of this config."""
        return to_run_config(self)

    def check_run(self, *, num_rounds: int, lora_rank: int,
                  num_clients: int | None = None) -> None:
        """Refuse values that do not fit the run (none here); ``num_clients`` when known.

        Raises:
            ValueError: naming the setting and the run value it conflicts with.

        """
