"""The strategies' settings reference, generated from the registry (``docs/strategy-settings.md``).

Every strategy's settings (keys, defaults, help) are written once, in its config class;
this module renders them, and a test checks that the committed reference and the
``[tool.flwr.app.config]`` table of ``pyproject.toml`` agree with it. Regenerate with
``python -m simulations.settings_reference > docs/strategy-settings.md``.
"""

from __future__ import annotations

from typing import Any

HEADER = """# Strategy settings

Generated from the strategies' config classes by `python -m simulations.settings_reference`
(a test fails when this file and the code disagree). Set them like any other setting
(`--run-config "key=value"`, or `[tool.flwr.app.config]` for `flwr run`); a strategy
reads only those of its config class, which may derive from another's (HetLoRA and
FlexLoRA both read the rank plan's settings of `strategies.hetero.RankConfig`).
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


def markdown() -> str:
    """The reference as markdown: one row per setting, with the config class declaring it.

    A strategy that reuses a config class (the rank plan of HetLoRA's and FlexLoRA's
    :class:`strategies.hetero.RankConfig`) adds no row and changes none.
    """
    lines = [HEADER, "| setting | default | declared by | what it sets |", "|---|---|---|---|"]
    for key, (default, help_text, owner) in sorted(strategy_settings().items()):
        lines.append(f"| `{key}` | {format_default(default)} | "
                     f"`{owner.__module__}.{owner.__name__}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
