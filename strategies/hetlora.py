"""HetLoRA (Cho et al., 2024): heterogeneous ranks, rank self-pruning, sparsity weights.

Each client trains at its own rank ``r_k <= r_max`` on the global factors truncated to
``r_k``, with the self-pruning regulariser ``lambda * sum_m ||B_tail|| ||A_tail||`` over
the last ``1 - gamma`` share of its rank. After training, a client whose tail carries
little (``||B_tail|| ||A_tail|| < threshold ||B|| ||A||`` in every module) shrinks to
``floor(gamma r_k)`` and reports the new rank, which it keeps in later rounds. The
server zero-pads every update to ``r_max`` and averages with sparsity weights
``p_k ~ sum_m ||s B_k A_k||_F`` (or data-size weights).

Defaults: ``gamma = 0.99`` as in the public reference implementations (so a rank-8
client's tail is its last column), ``lambda = 1e-3`` and ``threshold = 0.05``: the
paper does not pin the last two; they are settings (``hetlora-*``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import WARNING
from typing import Any

from flwr.supercore import log

from strategies.adapter import LoraAdapter
from strategies.fedit import normalized_weights
from strategies.hetero import HeteroRankStrategy
from strategies.hetlora_math import hetlora_aggregate, pad_adapter, sparsity_weights, with_alpha
from strategies.instructions import ConfigValue
from strategies.registry import register_strategy
from strategies.validation import ClientUpdate

WEIGHTINGS = ("sparsity", "data-size")


@register_strategy("hetlora")
class HetLoRA(HeteroRankStrategy):
    """Heterogeneous-rank LoRA with rank self-pruning and sparsity-weighted aggregation."""

    exact_rank = False  # a client may return a lower (pruned) rank

    def __init__(
        self, *, prune_lambda: float = 1e-3, prune_gamma: float = 0.99,
        prune_threshold: float = 0.05, weighting: str = "sparsity", **kwargs: Any,
    ) -> None:
        if prune_lambda < 0:
            raise ValueError(f"hetlora-lambda must not be negative, got {prune_lambda}")
        if not 0.0 < prune_gamma < 1.0:
            raise ValueError(f"hetlora-gamma must be in (0, 1), got {prune_gamma}")
        if prune_threshold < 0:
            raise ValueError(f"hetlora-threshold must not be negative, got {prune_threshold}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"hetlora-weighting must be one of {WEIGHTINGS}, got '{weighting}'")
        super().__init__(**kwargs)
        if self.client_dp is not None and weighting == "sparsity":
            log(WARNING, "hetlora: client-level DP averages with uniform weights (sparsity "
                "weights follow each client's update norm, which would leak it and break the "
                "noise calibration); hetlora-weighting=sparsity is ignored")
            weighting = "data-size"  # client-level DP sets every num-examples to 1
        if self.client_dp is not None and prune_threshold > 0:
            log(WARNING, "hetlora: with client-level DP, rank self-pruning lets a client's data "
                "choose its rank, which the aggregate shows and the epsilon does not cover; "
                "set hetlora-threshold=0 to keep ranks public")
        self.prune_lambda = prune_lambda
        self.prune_gamma = prune_gamma
        self.prune_threshold = prune_threshold
        self.weighting = weighting

    @classmethod
    def options_from(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """``hetlora-lambda``, ``hetlora-gamma``, ``hetlora-threshold``, ``hetlora-weighting``."""
        return {**super().options_from(settings),
                "prune_lambda": float(settings.get("hetlora-lambda", 1e-3)),
                "prune_gamma": float(settings.get("hetlora-gamma", 0.99)),
                "prune_threshold": float(settings.get("hetlora-threshold", 0.05)),
                "weighting": str(settings.get("hetlora-weighting", "sparsity"))}

    def client_options(self, server_round: int, node_id: int) -> dict[str, ConfigValue]:
        """The self-pruning settings for the client."""
        return {"prune-lambda": self.prune_lambda, "prune-gamma": self.prune_gamma,
                "prune-threshold": self.prune_threshold}

    def aggregate_adapters(
        self, server_round: int, global_adapter: LoraAdapter, updates: Sequence[ClientUpdate]
    ) -> LoraAdapter:
        """Zero-pad to ``r_max``, weight (sparsity or data size), average; note new ranks."""
        r_max = global_adapter.max_rank
        padded = [with_alpha(pad_adapter(u.adapter, r_max), global_adapter.alpha)
                  for u in updates if u.adapter is not None]
        for update in updates:
            if update.adapter is not None:
                self.ranks[update.node_id] = update.adapter.max_rank  # pruned ranks stick
        if self.weighting == "sparsity":
            weights = sparsity_weights(padded)
        else:
            weights = normalized_weights([u.num_examples for u in updates])
        stats = self.history[server_round]
        stats.details["aggregation_weights"] = {
            str(u.node_id): float(w) for u, w in zip(updates, weights, strict=True)}
        return hetlora_aggregate(padded, weights, r_max)
