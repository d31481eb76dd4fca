"""Shared glue for strategies whose clients train at different ranks.

The server keeps the global adapter at the maximum rank ``r_max`` with the run's alpha.
A client at rank ``r_k`` gets the global factors truncated to ``r_k`` and the alpha
``alpha * r_k / r_max``, so every client uses the same scale ``alpha / r_max``: a
truncated (or zero-padded) adapter then means exactly the same update, and factors of
different ranks can be combined without rescaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strategies.adapter import LoraAdapter
from strategies.base import LoraStrategy
from strategies.codec import record_to_adapter
from strategies.config import StrategyConfig, check, setting
from strategies.hetlora_math import truncate_adapter
from strategies.ranks import DISTRIBUTIONS, RankPlan, parse_ranks


@dataclass(frozen=True)
class RankConfig(StrategyConfig):
    """How clients get their ranks (``hetlora``, ``flexlora``): see :mod:`strategies.ranks`."""

    rank_distribution: str = setting(
        "fixed", "rank per client: fixed | uniform | heavy-tail | normal over rank-choices")
    rank_choices: str = setting("", "comma-separated ranks the distribution draws from")
    client_ranks: str = setting(
        "", "an explicit rank per client (sorted node ids), overriding the distribution")

    def __post_init__(self) -> None:
        check(self.rank_distribution in DISTRIBUTIONS,
              f"rank-distribution must be one of {DISTRIBUTIONS}, got "
              f"'{self.rank_distribution}'")
        parse_ranks(self.rank_choices, "rank-choices")
        parse_ranks(self.client_ranks, "client-ranks")

    def rank_plan(self, max_rank: int) -> RankPlan:
        """The plan for a global rank of ``max_rank`` (``lora-rank``)."""
        return RankPlan(max_rank=max_rank, distribution=self.rank_distribution,
                        choices=parse_ranks(self.rank_choices, "rank-choices"),
                        explicit=parse_ranks(self.client_ranks, "client-ranks"))

    def check_run(self, *, num_rounds: int, lora_rank: int,
                  num_clients: int | None = None) -> None:
        """Ranks above ``lora-rank``, or an explicit list of the wrong length, are refused."""
        plan = self.rank_plan(lora_rank)
        if num_clients is not None:
            plan.check_num_clients(num_clients)


class HeteroRankStrategy(LoraStrategy):
    """A LoRA strategy with a rank per client, from the :class:`RankConfig`'s plan."""

    config_class = RankConfig
    config: RankConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rank_plan: RankPlan | None = None  # made at the first round's global rank
        self.ranks: dict[int, int] = {}  # current rank of each node seen so far

    def plan(self, global_adapter: LoraAdapter) -> RankPlan:
        """The rank plan at the global adapter's rank."""
        if self.rank_plan is None or self.rank_plan.max_rank != global_adapter.max_rank:
            self.rank_plan = self.config.rank_plan(global_adapter.max_rank)
        return self.rank_plan

    def client_rank(self, node_id: int, global_adapter: LoraAdapter) -> int:
        """The node's rank: assigned at first sight, then as the node last reported."""
        if node_id not in self.ranks:
            self.ranks.update(self.plan(global_adapter).assign([node_id], self.sampler.rng))
        return min(self.ranks[node_id], global_adapter.max_rank)

    def client_alpha(self, rank: int, global_adapter: LoraAdapter) -> float:
        """``alpha * r_k / r_max``: the same scale for every rank."""
        return self.lora_alpha * rank / global_adapter.max_rank

    def client_adapter(
        self, server_round: int, node_id: int, global_adapter: LoraAdapter, rank: int
    ) -> LoraAdapter:
        """The global factors truncated to the node's rank, with its alpha."""
        truncated = truncate_adapter(global_adapter, rank)
        return LoraAdapter(truncated.modules, self.client_alpha(rank, global_adapter),
                           truncated.extras)

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        """Assign ranks to every connected node before the first payloads are built.

        With an explicit rank list, waits until as many nodes as it has ranks are
        connected (nodes may still be registering when the first round starts).
        """
        plan = self.plan(record_to_adapter(arrays, self.lora_alpha))
        if plan.explicit and not self.ranks:
            nodes = self.connected_nodes(grid, max(len(plan.explicit), self.min_available_nodes))
            plan.check_num_clients(len(nodes))
            self.ranks.update(plan.assign(nodes, self.sampler.rng))
        return super().configure_train(server_round, arrays, config, grid)

    def state_dict(self) -> dict[str, Any]:
        """The sampling generator and the ranks of the nodes seen so far (to resume)."""
        return {**super().state_dict(), "ranks": {str(k): v for k, v in self.ranks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the generator and the nodes' ranks (pruned ranks stay pruned)."""
        super().load_state_dict(state)
        self.ranks = {int(k): int(v) for k, v in state.get("ranks", {}).items()}
