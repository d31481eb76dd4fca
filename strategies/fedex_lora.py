"""FedEx-LoRA (Singhal et al., 2025): FedIT made exact by folding its error into the base.

FedIT's global update ``s avg(B) avg(A)`` is not the average of the clients' updates
``avg(s B_k A_k)``. FedEx-LoRA keeps FedIT's averaged factors and adds the residual

    R = avg_k(s B_k A_k) - s avg(B) avg(A)      (data-size weights)

to the frozen base weight of every module, so the effective model after aggregation,
``W0 + sum of residuals + s avg(B) avg(A)``, is exactly the average of the clients'
effective models. The residuals accumulate in a dense ``out x in`` delta per module
(``<module>.base_delta``, the ``base`` part), which every client downloads each round
with the factors and applies to its base weights: the price of exactness is that
download, measured in ``bytes-down`` and reported per round as ``base-delta-bytes``.

The average of products is streamed (one float64 ``out x in`` sum per module), so the
server's memory stays flat in the number of clients. ``agg-error-*`` is the relative
error of the effective update after folding (float32 rounding, against the float64 sum);
``residual-norm-*`` is FedIT's error that was folded in.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from strategies.adapter import LoraAdapter
from strategies.aggregation import Aggregation
from strategies.fedit import FedIT, RunningAverage
from strategies.parts import ADAPTER_PARTS, ALL_PARTS
from strategies.registry import register_strategy
from strategies.round_stats import RoundStats
from strategies.sparse import dense_key, is_dense_key
from strategies.validation import ClientUpdate


def relative_norm(x: np.ndarray, reference: np.ndarray) -> float:
    """``||x|| / ||reference||`` (0 when both are zero)."""
    denominator = float(np.linalg.norm(reference))
    return float(np.linalg.norm(x)) / denominator if denominator > 0 else 0.0


class FedExRound(RunningAverage):
    """FedIT's running average plus the running average of the clients' products."""

    def __init__(self, strategy: FedExLoRA, server_round: int,
                 global_adapter: LoraAdapter) -> None:
        super().__init__(global_adapter, strategy.send_parts)
        self.strategy = strategy
        self.server_round = server_round
        self.products = {name: np.zeros((f.out_features, f.in_features), dtype=np.float64)
                         for name, f in global_adapter.modules.items()}

    def add(self, update: ClientUpdate) -> None:
        """Fold in the update's factors (as FedIT) and ``n_k s B_k A_k`` of every module."""
        super().add(update)
        assert update.adapter is not None  # RunningAverage.add checked it
        n = float(update.num_examples)
        for name, f in update.adapter.modules.items():
            scale = update.adapter.scale(name)
            self.products[name] += (n * scale) * (f.B.astype(np.float64) @ f.A.astype(np.float64))

    def result(self) -> LoraAdapter:
        """FedIT's average with the residual of every module added to its base delta."""
        averaged = super().result()
        extras = dict(averaged.extras)
        residual_norms, errors = {}, {}
        for name, f in averaged.modules.items():
            target = self.products[name] / self.total  # avg(s B_k A_k), float64
            product = averaged.scale(name) * (f.B.astype(np.float64) @ f.A.astype(np.float64))
            residual = target - product
            key = dense_key(name)
            previous = self.global_adapter.extras.get(key)
            folded = residual if previous is None else previous.astype(np.float64) + residual
            extras[key] = folded.astype(np.float32)
            # the effective update as clients will apply it (float32), against the exact one
            applied = (extras[key].astype(np.float64)
                       - (0.0 if previous is None else previous.astype(np.float64)) + product)
            residual_norms[name] = relative_norm(residual, target)
            errors[name] = relative_norm(applied - target, target)
        self.strategy.record(self.server_round, residual_norms, errors, extras)
        return LoraAdapter(averaged.modules, averaged.alpha, extras)


@register_strategy("fedex-lora")
class FedExLoRA(FedIT):
    """FedIT plus the exact residual ``avg(s B A) - s avg(B) avg(A)`` folded into the base."""

    train_parts: ClassVar[frozenset[str]] = ADAPTER_PARTS
    send_parts: ClassVar[frozenset[str]] = ADAPTER_PARTS
    download_parts: ClassVar[frozenset[str]] = ALL_PARTS  # the factors and the base deltas
    secure_aggregation_refusal = (
        "its residual avg(s B_k A_k) - s avg(B) avg(A) needs each client's product B_k A_k, "
        "not only the sum of the factors; use fedit or ffa-lora (exact without a residual)")
    client_dp_refusal = (
        "its residual avg(s B_k A_k) - s avg(B) avg(A) is built from each client's product "
        "B_k A_k, which client-level DP's clipping of the factors does not bound and its "
        "noise on the averaged factors does not cover; use fedit or ffa-lora with "
        "client-level DP")
    coordinate_wise_refusal = (
        "its residual is computed from the mean of the clients' products, which a "
        "coordinate-wise median or trimmed mean of the factors would no longer match; use "
        "aggregator=norm-clip or mean (with update-norm-bound)")

    def start_aggregation(self, server_round: int, global_adapter: LoraAdapter) -> Aggregation:
        """FedIT's running average plus the running average of the products."""
        return FedExRound(self, server_round, global_adapter)

    def record(self, server_round: int, residual_norms: dict[str, float],
               errors: dict[str, float], extras: dict[str, np.ndarray]) -> None:
        """The round's exactness figures and what the base deltas cost on the wire."""
        stats = self.history.setdefault(server_round, RoundStats(round=server_round))
        stats.details["aggregation_error"] = errors
        stats.details["residual_norm"] = residual_norms
        if errors:
            stats.metrics["agg-error-mean"] = float(np.mean(list(errors.values())))
            stats.metrics["agg-error-max"] = float(np.max(list(errors.values())))
            stats.metrics["residual-norm-mean"] = float(np.mean(list(residual_norms.values())))
        stats.metrics["base-delta-bytes"] = float(sum(
            v.nbytes for k, v in extras.items() if is_dense_key(k)))
