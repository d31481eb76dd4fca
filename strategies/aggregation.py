"""A round's aggregation: the interface a strategy's accumulator implements, and its wrappers.

:class:`Aggregation` folds validated updates in one at a time; :class:`CollectedUpdates`
keeps them for rules that need all at once. :class:`ClientDP` is what client-level DP
(``privacy.client_level.ClientLevelDP``) provides to wrap an aggregation; this package does
not import ``privacy``: the server builds the mechanism and hands it over.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from strategies.adapter import LoraAdapter
from strategies.validation import ClientUpdate

if TYPE_CHECKING:
    from strategies.base import LoraStrategy


class AggregationError(RuntimeError):
    """A round whose accepted updates could not be aggregated."""


#: the node id of a secure round's one update: the mean of its clients' summands
SECURE_SUM_NODE = -1


@dataclass(frozen=True)
class SecureMean:
    """What a secure round reveals: the weighted mean of its clients' summands, and counts.

    Attributes:
        state: key -> the weighted mean of what the clients sent, at the global shapes.
        weight: the summed weight (example counts; the client count under client-level DP).
        contributors: the nodes whose inputs are in the sum.
        train_loss: the weighted mean of their train losses (None if not summed).
        ranks: each contributor's adapter rank, which it reports in clear.

    """

    state: dict[str, np.ndarray]
    weight: float
    contributors: tuple[int, ...]
    train_loss: float | None = None
    ranks: dict[int, int] = field(default_factory=dict)


class Aggregation(ABC):
    """Folds one round's validated updates, one at a time, into the next global adapter."""

    count: int = 0

    @abstractmethod
    def add(self, update: ClientUpdate) -> None:
        """Fold in one validated update (its message can be dropped afterwards)."""

    @abstractmethod
    def result(self) -> LoraAdapter:
        """The new global adapter from every update added so far."""


class PrivateAggregation(Protocol):
    """A round's aggregation under client-level DP; ``metrics`` are its round figures."""

    count: int
    metrics: dict[str, float]

    def add(self, update: ClientUpdate) -> None:
        """Clip and fold in one validated update."""

    def add_mean(self, update: ClientUpdate, contributors: int) -> None:
        """Fold in a secure round's mean of ``contributors`` updates, each clipped by its client."""

    def result(self) -> LoraAdapter:
        """The noisy aggregate (charged to the privacy ledger)."""


class ClientDP(Protocol):
    """Client-level DP around a strategy's aggregation (``privacy.client_level.ClientLevelDP``)."""

    def wrap(self, aggregation: Aggregation, *, server_round: int, sampled: int,
             available: int, reference: Callable[[int], Mapping[str, np.ndarray]],
             ) -> PrivateAggregation:
        """The round's aggregation with clipping, uniform weights and noise."""

    def metrics(self) -> dict[str, float]:
        """Cumulative figures reported every round (the client-level epsilon)."""

    def describe(self) -> str:
        """One line for the logs."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for a resumed run (the accountant's history)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class CollectedUpdates(Aggregation):
    """Keeps every update and applies the strategy's rule once all are in.

    For rules that need all updates at once (FlexLoRA's SVD of their sum): each update
    kept is its adapter factors and counts; the reply messages are not kept.
    """

    def __init__(self, strategy: LoraStrategy, server_round: int,
                 global_adapter: LoraAdapter) -> None:
        self.strategy = strategy
        self.server_round = server_round
        self.global_adapter = global_adapter
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        """Keep the update."""
        self.updates.append(update)
        self.count += 1

    def result(self) -> LoraAdapter:
        """The strategy's :meth:`LoraStrategy.aggregate_adapters` over the kept updates."""
        return self.strategy.aggregate_adapters(self.server_round, self.global_adapter,
                                                self.updates)


