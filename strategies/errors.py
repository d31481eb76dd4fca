"""Errors a strategy raises about what it received or could not aggregate."""

from __future__ import annotations


class UpdateRejected(ValueError):
    """A client update that must not be aggregated; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AggregationError(RuntimeError):
    """A round whose accepted updates could not be aggregated."""
