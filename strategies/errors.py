"""Errors a strategy raises about what it received or could not aggregate."""

from __future__ import annotations

#: the error code of a client refusing a round that would exceed its privacy budget: a
#: deliberate end of its training, not a failure
BUDGET_REFUSAL_CODE = 4001


class UpdateRejected(ValueError):
    """A client update that must not be aggregated; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AggregationError(RuntimeError):
    """A round whose accepted updates could not be aggregated."""
