"""Shared glue for strategies whose clients train at different ranks.

The server keeps the global adapter at the maximum rank ``r_max`` with the run's alpha.
A client at rank ``r_k`` gets the global factors truncated to ``r_k`` and the alpha
``alpha * r_k / r_max``, so every client uses the same scale ``alpha / r_max``: a
truncated (or zero-padded) adapter then means exactly the same update, and factors of
different ranks can be combined without rescaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies.adapter import LoraAdapter
from strategies.base import LoraStrategy
from strategies.hetlora_math import truncate_adapter
from strategies.ranks import RankPlan, parse_ranks


class HeteroRankStrategy(LoraStrategy):
    """A LoRA strategy with a rank per client, from a :class:`RankPlan`."""

    def __init__(self, *, rank_plan: RankPlan | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rank_plan = rank_plan
        self.ranks: dict[int, int] = {}  # current rank of each node seen so far

    @classmethod
    def options_from(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The rank plan (``rank-distribution``, ``rank-choices``, ``client-ranks``)."""
        return {**super().options_from(settings), "rank_plan": RankPlan(
            max_rank=int(settings["lora-rank"]),
            distribution=str(settings.get("rank-distribution", "fixed")),
            choices=parse_ranks(str(settings.get("rank-choices", "")), "rank-choices"),
            explicit=parse_ranks(str(settings.get("client-ranks", "")), "client-ranks"),
        )}

    def client_rank(self, node_id: int, global_adapter: LoraAdapter) -> int:
        """The node's rank: assigned at first sight, then as the node last reported."""
        if node_id not in self.ranks:
            plan = self.rank_plan or RankPlan(max_rank=global_adapter.max_rank)
            self.ranks.update(plan.assign([node_id], self._rng))
        return min(self.ranks[node_id], global_adapter.max_rank)

    def assign_ranks(self, node_ids: list[int], global_adapter: LoraAdapter) -> None:
        """Assign ranks to all nodes not seen yet (explicit lists need all nodes at once)."""
        new = [n for n in node_ids if n not in self.ranks]
        if new:
            plan = self.rank_plan or RankPlan(max_rank=global_adapter.max_rank)
            self.ranks.update(plan.assign(new, self._rng))

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
        if self.rank_plan is not None and self.rank_plan.explicit and not self.ranks:
            nodes = self.connected_nodes(
                grid, max(len(self.rank_plan.explicit), self.min_available_nodes))
            self.rank_plan.check_num_clients(len(nodes))
            self.ranks.update(self.rank_plan.assign(nodes, self._rng))
        return super().configure_train(server_round, arrays, config, grid)

    def state_dict(self) -> dict[str, Any]:
        """The sampling generator and the ranks of the nodes seen so far (to resume)."""
        return {**super().state_dict(), "ranks": {str(k): v for k, v in self.ranks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the generator and the nodes' ranks (pruned ranks stay pruned)."""
        super().load_state_dict(state)
        self.ranks = {int(k): int(v) for k, v in state.get("ranks", {}).items()}
