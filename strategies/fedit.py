"""FedIT: federated averaging of LoRA factors (Zhang et al., 2024), the baseline.

``A`` and ``B`` are averaged separately, weighted by each client's example count.
This is inexact: ``avg(B) @ avg(A) != avg(B @ A)``; FFA-LoRA and FlexLoRA address it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO

import numpy as np
from flwr.supercore import log

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.aggregation import Aggregation
from strategies.base import LoraStrategy
from strategies.exactness import aggregation_error
from strategies.parts import select_parts
from strategies.registry import register_strategy
from strategies.round_stats import RoundStats
from strategies.validation import ClientUpdate

#: FedIT keeps the clients' factors for the aggregation-error metric up to this size
ERROR_METRIC_MAX_BYTES = 256 * 2**20


def normalized_weights(counts: Sequence[float]) -> np.ndarray:
    """Weights proportional to ``counts``, summing to one."""
    w = np.asarray(counts, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights need positive finite counts, got {list(counts)}")
    return w / w.sum()


def weighted_mean(arrays: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``sum_k w_k x_k`` accumulated in float64, returned in the dtype of the inputs."""
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for w, x in zip(weights, arrays, strict=True):
        acc += w * x
    return acc.astype(arrays[0].dtype)


def fedit_aggregate(adapters: Sequence[LoraAdapter], num_examples: Sequence[int]) -> LoraAdapter:
    """Average each factor and each extra weight across clients, weighted by data size.

    All adapters must share keys and shapes (same rank per module).
    """
    if not adapters:
        raise ValueError("fedit_aggregate needs at least one adapter")
    return weighted_average_adapters(adapters, normalized_weights(num_examples))


def weighted_average_adapters(adapters: Sequence[LoraAdapter], w: np.ndarray) -> LoraAdapter:
    """``sum_k w_k adapter_k``: every factor and extra averaged with normalised weights ``w``.

    All adapters must share keys and shapes; the result has the first one's alpha.
    """
    first = adapters[0]
    modules = {
        name: LoraFactors(
            A=weighted_mean([a.modules[name].A for a in adapters], w),
            B=weighted_mean([a.modules[name].B for a in adapters], w),
        )
        for name in first.modules
    }
    extras = {key: weighted_mean([a.extras[key] for a in adapters], w) for key in first.extras}
    return LoraAdapter(modules=modules, alpha=first.alpha, extras=extras)


def average_parts(
    global_adapter: LoraAdapter,
    adapters: Sequence[LoraAdapter],
    num_examples: Sequence[int],
    parts: Iterable[str],
) -> LoraAdapter:
    """The global adapter with ``parts`` replaced by their data-size weighted average.

    Parts not listed are taken from ``global_adapter`` unchanged (bit for bit).
    """
    if not adapters:
        raise ValueError("average_parts needs at least one adapter")
    w = normalized_weights(num_examples)
    keys = select_parts(global_adapter.to_state_dict(), parts)
    states = [a.to_state_dict() for a in adapters]
    state = global_adapter.to_state_dict()
    state.update({k: weighted_mean([s[k] for s in states], w) for k in keys})
    return LoraAdapter.from_state_dict(state, global_adapter.alpha)


class RunningAverage(Aggregation):
    """The data-size weighted average of some adapter parts, folded in one update at a time.

    Holds one float64 sum per averaged tensor and the total weight: its memory does not
    depend on the number of clients. Parts not averaged are the global adapter's, bit
    for bit. ``keep_bytes`` bounds how many clients' factors are also kept for the
    aggregation-error metric (``None`` once the bound is passed: the metric is skipped).
    """

    def __init__(self, global_adapter: LoraAdapter, parts: Iterable[str],
                 keep_bytes: int = 0) -> None:
        self.global_adapter = global_adapter
        state = global_adapter.to_state_dict()
        self.keys = select_parts(state, parts)
        self.dtypes = {k: state[k].dtype for k in self.keys}
        self.sums = {k: np.zeros(state[k].shape, dtype=np.float64) for k in self.keys}
        self.total = 0.0
        self.keep_bytes = keep_bytes
        self.kept: list[tuple[LoraAdapter, int]] | None = [] if keep_bytes > 0 else None
        self.kept_bytes = 0

    def add(self, update: ClientUpdate) -> None:
        """Add ``n_k x_k`` for every averaged tensor ``x`` of the update."""
        if update.adapter is None:
            raise ValueError(f"update from node {update.node_id} carries no adapter")
        n = float(update.num_examples)
        if not (n > 0 and np.isfinite(n)):
            raise ValueError(f"weights need positive finite counts, got {update.num_examples}")
        state = update.adapter.to_state_dict()
        for key in self.keys:
            self.sums[key] += n * state[key]
        self.total += n
        self.count += 1
        if self.kept is not None:
            self.kept_bytes += sum(f.A.nbytes + f.B.nbytes
                                   for f in update.adapter.modules.values())
            if self.kept_bytes > self.keep_bytes:
                log(INFO, "aggregation error: the round's factors exceed %d MB; metric skipped",
                    self.keep_bytes // 2**20)
                self.kept = None
            else:
                self.kept.append((update.adapter, update.num_examples))

    def result(self) -> LoraAdapter:
        """The global adapter with the averaged parts replaced by ``sum_k n_k x_k / sum_k n_k``."""
        if self.count == 0:
            raise ValueError("an average needs at least one update")
        state = self.global_adapter.to_state_dict()
        state.update({k: (s / self.total).astype(self.dtypes[k]) for k, s in self.sums.items()})
        return LoraAdapter.from_state_dict(state, self.global_adapter.alpha)


@register_strategy("fedit")
class FedIT(LoraStrategy):
    """FedAvg of LoRA: every client trains A and B at the global rank; the server averages.

    The average is streamed (:class:`RunningAverage`): the server's memory stays flat
    in the number of clients per round.
    """

    #: the aggregation-error metric keeps the round's factors up to this many bytes
    error_metric_max_bytes: int = ERROR_METRIC_MAX_BYTES

    def start_aggregation(self, server_round: int, global_adapter: LoraAdapter) -> Aggregation:
        """A running average of the parts clients send."""
        return _FedITRound(self, server_round, global_adapter)

    def after_aggregation(self, server_round: int, global_adapter: LoraAdapter,
                          aggregation: RunningAverage) -> None:
        """Round metrics that need the finished aggregate (subclasses add theirs)."""

    def record_aggregation_error(
        self, server_round: int, aggregate: LoraAdapter, adapters: Sequence[LoraAdapter],
        counts: Sequence[int],
    ) -> None:
        """Log ``||avg(B) avg(A) - avg(B A)|| / ||avg(B A)||`` per module for this round."""
        errors = aggregation_error(aggregate, adapters, normalized_weights(counts))
        stats = self.history[server_round]
        stats.details["aggregation_error"] = errors
        if errors:
            values = list(errors.values())
            stats.metrics["agg-error-mean"] = float(np.mean(values))
            stats.metrics["agg-error-max"] = float(np.max(values))


class _FedITRound(RunningAverage):
    """FedIT's running average, with the strategy's round metrics when it finishes."""

    def __init__(self, strategy: FedIT, server_round: int, global_adapter: LoraAdapter) -> None:
        super().__init__(global_adapter, strategy.send_parts,
                         keep_bytes=strategy.error_metric_max_bytes
                         if strategy.individual_updates_visible else 0)
        self.strategy = strategy
        self.server_round = server_round

    def result(self) -> LoraAdapter:
        """The average; then the aggregation error and the strategy's own metrics."""
        new_global = super().result()
        self.strategy.history.setdefault(self.server_round, RoundStats(round=self.server_round))
        if self.kept:
            adapters, counts = zip(*self.kept, strict=True)
            self.strategy.record_aggregation_error(self.server_round, new_global,
                                                   adapters, counts)
        self.strategy.after_aggregation(self.server_round, self.global_adapter, self)
        return new_global
