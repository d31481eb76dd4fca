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

The client side (the regulariser and the rank cut) is :class:`HetLoRAClient`, registered
with the strategy; it reads the same :class:`HetLoRAConfig` from the round's options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import TYPE_CHECKING, Any

from flwr.supercore import log

from strategies.adapter import LoraAdapter
from strategies.aggregation import SECURE_SUM_NODE
from strategies.client_hooks import ClientHooks, LocalModel, Penalty
from strategies.config import StrategyConfig, check, setting
from strategies.fedit import normalized_weights
from strategies.hetero import HeteroRankStrategy, RankConfig
from strategies.hetlora_math import (
    hetlora_aggregate,
    kept_rank,
    pad_adapter,
    pruned_rank,
    sparsity_weights,
    truncate_adapter,
    with_alpha,
)
from strategies.instructions import ClientInstructions
from strategies.registry import register_strategy
from strategies.validation import ClientUpdate

if TYPE_CHECKING:
    import torch

WEIGHTINGS = ("sparsity", "data-size")


@dataclass(frozen=True)
class HetLoRAConfig(RankConfig):
    """HetLoRA's settings, beside the rank plan's."""

    hetlora_lambda: float = setting(1e-3, "strength of the rank self-pruning regulariser")
    hetlora_gamma: float = setting(0.99, "share of a client's rank kept when it prunes")
    hetlora_threshold: float = setting(
        0.05, "prune when every module's tail norm is below this share of its whole")
    hetlora_weighting: str = setting("sparsity", "aggregation weights: sparsity | data-size")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.hetlora_lambda >= 0,
              f"hetlora-lambda must not be negative, got {self.hetlora_lambda}")
        check(0.0 < self.hetlora_gamma < 1.0,
              f"hetlora-gamma must be in (0, 1), got {self.hetlora_gamma}")
        check(self.hetlora_threshold >= 0,
              f"hetlora-threshold must not be negative, got {self.hetlora_threshold}")
        check(self.hetlora_weighting in WEIGHTINGS,
              f"hetlora-weighting must be one of {WEIGHTINGS}, got '{self.hetlora_weighting}'")


def lora_factor_pairs(model: Any, adapter_name: str) -> list[tuple[Any, Any]]:
    """``(A, B)`` weight pairs of every LoRA layer of one adapter of a PEFT model."""
    import torch

    pairs = []
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter_name in lora_a:
            pairs.append((lora_a[adapter_name].weight, lora_b[adapter_name].weight))
    return pairs


def self_pruning_penalty(model: Any, adapter_name: str, gamma: float) -> torch.Tensor:
    """HetLoRA's rank self-pruning term ``sum_m ||B_m tail|| ||A_m tail||`` (unweighted).

    The tail is the last ``1 - gamma`` share of the rank (indices from
    ``kept_rank(r, gamma)`` on), the part a client may later prune.
    """
    import torch

    total = torch.zeros(())
    for a, b in lora_factor_pairs(model, adapter_name):
        keep = kept_rank(a.shape[0], gamma)
        if keep < a.shape[0]:
            total = total.to(a.device) + a[keep:].norm() * b[:, keep:].norm()
    return total


def prune(adapter: LoraAdapter, gamma: float, threshold: float) -> LoraAdapter:
    """Shrink the adapter's rank when every module's tail is small, else keep it.

    The adapter keeps its scale: alpha shrinks with the rank.
    """
    if adapter.max_rank < 2:
        return adapter
    new_rank = max(pruned_rank(f, gamma, threshold) for f in adapter.modules.values())
    if new_rank >= adapter.max_rank:
        return adapter
    truncated = truncate_adapter(adapter, new_rank)
    return LoraAdapter(truncated.modules, adapter.alpha * new_rank / adapter.max_rank,
                       truncated.extras)


class HetLoRAClient(ClientHooks):
    """The self-pruning regulariser during training, the rank cut after it."""

    def penalty(self, local: LocalModel, instructions: ClientInstructions) -> Penalty | None:
        """``lambda * sum ||B_tail|| ||A_tail||`` (None when ``hetlora-lambda`` is 0)."""
        config = HetLoRAConfig.from_run_config(instructions.options)
        if config.hetlora_lambda <= 0:
            return None
        return lambda: config.hetlora_lambda * self_pruning_penalty(
            local.model, local.active, config.hetlora_gamma)

    def after_training(self, adapter: LoraAdapter,
                       instructions: ClientInstructions) -> LoraAdapter:
        """The adapter pruned to a lower rank when its tails are small."""
        config = HetLoRAConfig.from_run_config(instructions.options)
        return prune(adapter, config.hetlora_gamma, config.hetlora_threshold)


@register_strategy("hetlora")
class HetLoRA(HeteroRankStrategy):
    """Heterogeneous-rank LoRA with rank self-pruning and sparsity-weighted aggregation."""

    config_class = HetLoRAConfig
    config: HetLoRAConfig
    client_hooks = HetLoRAClient()
    exact_rank = False  # a client may return a lower (pruned) rank

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weighting = self.config.hetlora_weighting
        if self.client_dp is not None and self.weighting == "sparsity":
            log(WARNING, "hetlora: client-level DP averages with uniform weights (sparsity "
                "weights follow each client's update norm, which would leak it and break the "
                "noise calibration); hetlora-weighting=sparsity is ignored")
            self.weighting = "data-size"  # client-level DP sets every num-examples to 1
        if self.client_dp is not None and self.config.hetlora_threshold > 0:
            log(WARNING, "hetlora: with client-level DP, rank self-pruning lets a client's data "
                "choose its rank, which the aggregate shows and the epsilon does not cover; "
                "set hetlora-threshold=0 to keep ranks public")

    @classmethod
    def secure_aggregation_refusal_for(cls, config: StrategyConfig) -> str:
        """Sparsity weights need each client's update norm; data-size weights are linear."""
        if isinstance(config, HetLoRAConfig) and config.hetlora_weighting == "sparsity":
            return ("hetlora-weighting=sparsity weights each client by the norm of its own "
                    "update (sum_m ||s B_k A_k||), which the server would have to see; set "
                    "hetlora-weighting=data-size (zero-padded factors average linearly)")
        return ""

    def note_secure_ranks(self, ranks: Mapping[int, int]) -> None:
        """Pruned ranks stick: in a secure round each client reports its rank in clear.

        A rank above what the node was sent, or below 1, is ignored.
        """
        for node_id, rank in ranks.items():
            payload = self.sent_payload(node_id)
            if payload is not None and 1 <= rank <= payload.instructions.rank:
                self.ranks[node_id] = rank

    def aggregate_adapters(
        self, server_round: int, global_adapter: LoraAdapter, updates: Sequence[ClientUpdate]
    ) -> LoraAdapter:
        """Zero-pad to ``r_max``, weight (sparsity or data size), average; note new ranks."""
        r_max = global_adapter.max_rank
        padded = [with_alpha(pad_adapter(u.adapter, r_max), global_adapter.alpha)
                  for u in updates if u.adapter is not None]
        for update in updates:
            if update.adapter is not None and update.node_id != SECURE_SUM_NODE:
                self.ranks[update.node_id] = update.adapter.max_rank  # pruned ranks stick
        if self.weighting == "sparsity":
            weights = sparsity_weights(padded)
        else:
            weights = normalized_weights([u.num_examples for u in updates])
        if self.individual_updates_visible:
            self.history[server_round].details["aggregation_weights"] = {
                str(u.node_id): float(w) for u, w in zip(updates, weights, strict=True)}
        return hetlora_aggregate(padded, weights, r_max)
