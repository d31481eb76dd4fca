"""What happened in one training round: counts, bytes, losses, rejections, per-node figures."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING

from flwr.supercore import log


@dataclass
class RoundStats:
    """What happened in one training round, for logs and the results folder."""

    round: int
    sampled: int = 0
    available: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float | None = None
    rejections: list[tuple[int, str]] = field(default_factory=list)
    #: (node, error) of each reply that came back as an error (the client failed)
    failures: list[tuple[int, str]] = field(default_factory=list)
    #: the error code of each failed node's reply (a budget refusal is not a failure)
    failure_codes: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    client_ranks: dict[int, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict[str, float]] = field(default_factory=dict)
    #: per accepted node: the bytes it uploaded and its (train loss, example count)
    node_bytes: dict[int, int] = field(default_factory=dict)
    node_losses: dict[int, tuple[float, int]] = field(default_factory=dict)
    _loss_sum: float = field(default=0.0, repr=False)
    _loss_weight: float = field(default=0.0, repr=False)

    def reject(self, node_id: int, reason: str) -> None:
        """Count and log a rejected update."""
        self.rejected += 1
        self.rejections.append((node_id, reason))
        log(WARNING, "round %d: rejected update from node %d: %s", self.round, node_id, reason)

    def accept(self, node_id: int, rank: int, nbytes: int, metrics: Mapping[str, float],
               num_examples: int) -> None:
        """Count a valid update: its rank, bytes, train loss and example-level epsilon."""
        self.accepted += 1
        self.client_ranks[node_id] = rank
        self.node_bytes[node_id] = nbytes
        self.bytes_up += nbytes
        if "train-loss" in metrics:
            self.node_losses[node_id] = (metrics["train-loss"], num_examples)
            self._loss_sum += metrics["train-loss"] * num_examples
            self._loss_weight += num_examples
            self.train_loss = self._loss_sum / self._loss_weight
        if "dp-epsilon" in metrics:  # cumulative example-level epsilon (DP-SGD)
            epsilons = self.details.setdefault("client_epsilon", {})
            epsilons[str(node_id)] = metrics["dp-epsilon"]
            self.metrics["dp-epsilon-max"] = max(epsilons.values())
        if metrics.get("dropped-examples"):  # records the client's data could not use
            dropped = self.details.setdefault("client_dropped_examples", {})
            dropped[str(node_id)] = int(metrics["dropped-examples"])
            self.metrics["dropped-examples"] = float(sum(dropped.values()))

    def withdraw(self, node_id: int, reason: str) -> None:
        """Reject an update that was counted as valid (robust screening, once all are in)."""
        self.accepted -= 1
        self.client_ranks.pop(node_id, None)
        self.bytes_up -= self.node_bytes.pop(node_id, 0)
        if self.node_losses.pop(node_id, None) is not None:
            self._update_train_loss()
        epsilons = self.details.get("client_epsilon", {})
        if epsilons.pop(str(node_id), None) is not None:
            if epsilons:
                self.metrics["dp-epsilon-max"] = max(epsilons.values())
            else:
                self.metrics.pop("dp-epsilon-max", None)
        dropped = self.details.get("client_dropped_examples", {})
        if dropped.pop(str(node_id), None) is not None:
            self.metrics["dropped-examples"] = float(sum(dropped.values()))
        self.reject(node_id, reason)

    def _update_train_loss(self) -> None:
        self._loss_sum = sum(loss * n for loss, n in self.node_losses.values())
        self._loss_weight = sum(n for _, n in self.node_losses.values())
        self.train_loss = self._loss_sum / self._loss_weight if self._loss_weight else None


