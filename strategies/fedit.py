"""FedIT: federated averaging of LoRA factors (Zhang et al., 2024), the baseline.

``A`` and ``B`` are averaged separately, weighted by each client's example count.
This is inexact: ``avg(B) @ avg(A) != avg(B @ A)``; FFA-LoRA and FlexLoRA address it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.base import LoraStrategy
from strategies.exactness import aggregation_error
from strategies.parts import select_parts
from strategies.registry import register_strategy
from strategies.validation import ClientUpdate


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


@register_strategy("fedit")
class FedIT(LoraStrategy):
    """FedAvg of LoRA: every client trains A and B at the global rank; the server averages."""

    def aggregate_adapters(
        self, server_round: int, global_adapter: LoraAdapter, updates: Sequence[ClientUpdate]
    ) -> LoraAdapter:
        """Weighted average of the parts clients send; records the aggregation error."""
        adapters = [u.adapter for u in updates if u.adapter is not None]
        counts = [u.num_examples for u in updates]
        new_global = average_parts(global_adapter, adapters, counts, self.send_parts)
        self.record_aggregation_error(server_round, new_global, adapters, counts)
        return new_global

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
