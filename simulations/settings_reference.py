"""The settings reference, generated from the settings classes (``docs/settings.md``).

Every setting (its key, default and help) is written once, in the dataclass that reads
it; this module renders them all, grouped as the run parses them, and a test checks that
the committed reference and the ``[tool.flwr.app.config]`` table of ``pyproject.toml``
agree with the code. Regenerate with
``python -m simulations.settings_reference > docs/settings.md``.
"""

from __future__ import annotations

from typing import Any

HEADER = """# Every setting

Generated from the settings classes by `python -m simulations.settings_reference` (a test
fails when this file and the code disagree). Set them with `fedlora simulate
--run-config "key=value key=value"` (or its dedicated options), or in
`[tool.flwr.app.config]` of `pyproject.toml` for `flwr run`; an unknown key is an error
that lists the known ones, and a bad value stops the run before anything starts, naming
the setting. A strategy reads only the settings of its config class, which may derive
from another's (HetLoRA, FlexLoRA and FLoRA share the rank plan of
`strategies.hetero.RankConfig`).
"""


def format_default(value: Any) -> str:
    """A default as the reference shows it (``""`` for an empty string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`" if value else '""'
    return f"{value:g}" if isinstance(value, float) else str(value)


def strategy_settings() -> dict[str, tuple[Any, str, type]]:
    """``{key: (default, help, the config class that declares it)}`` over every strategy."""
    from strategies.config import settings_help
    from strategies.registry import config_classes, key_owners

    rows: dict[str, tuple[Any, str, type]] = {}
    for config_class in config_classes().values():
        owners = key_owners(config_class)
        for key, (default, help_text) in settings_help(config_class).items():
            rows[key] = (default, help_text, owners[key])
    return rows


def groups() -> list[tuple[str, list[type]]]:
    """The settings classes by section, in the order the run parses them."""
    from privacy.secagg_config import SecureAggregationConfig
    from strategies.robust import RobustConfig
    from task.run_settings import FederationSettings
    from task.settings import (
        DataSettings,
        GenerationSettings,
        LoraSettings,
        ModelSettings,
        PrivacySettings,
        TrainSettings,
    )

    return [
        ("Federation", [FederationSettings]),
        ("Model", [ModelSettings]),
        ("Data", [DataSettings]),
        ("LoRA", [LoraSettings]),
        ("Local training", [TrainSettings]),
        ("DP-SGD on the clients", [PrivacySettings]),
        ("Generation (instruction task)", [GenerationSettings]),
        ("Robust aggregation", [RobustConfig]),
        ("Secure aggregation", [SecureAggregationConfig]),
    ]


def _row(key: str, default: Any, help_text: str, owner: type) -> str:
    return (f"| `{key}` | {format_default(default)} | `{owner.__module__}.{owner.__name__}` "
            f"| {help_text.replace('|', '/')} |")


def markdown() -> str:
    """The reference as markdown: a table per section, one row per setting.

    A key read by two classes (``seed``) is listed once, under the first. A strategy
    that reuses a config class adds no row.
    """
    from strategies.config import settings_help

    lines = [HEADER]
    seen: set[str] = set()
    header = ["| setting | default | declared by | what it sets |", "|---|---|---|---|"]
    for title, classes in groups():
        lines += [f"## {title}", "", *header]
        for cls in classes:
            for key, (default, help_text) in settings_help(cls).items():
                if key not in seen:
                    seen.add(key)
                    lines.append(_row(key, default, help_text, cls))
        lines.append("")
    lines += ["## Strategies", "", *header]
    for key, (default, help_text, owner) in sorted(strategy_settings().items()):
        lines.append(_row(key, default, help_text, owner))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
