"""Parsing ``--run-config "key=value key=value"`` strings (no heavy imports)."""

from __future__ import annotations

import shlex


def parse_run_config(text: str) -> dict[str, str]:
    """Split ``key=value`` pairs (shell-style quoting) into a dict of strings.

    Values are typed later, by the settings dataclasses.

    Raises:
        ValueError: an item without ``=`` or with an empty key.

    """
    config: dict[str, str] = {}
    for item in shlex.split(text or ""):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--run-config items must look like key=value, got '{item}'")
        config[key.strip()] = value
    return config
