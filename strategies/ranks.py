"""Per-client LoRA ranks: an explicit list, or a named distribution over a set of ranks.

Distributions (over ``choices`` sorted ascending, ``r_1 < ... < r_m``):

- ``fixed``: every client at the largest choice;
- ``uniform``: each rank with probability 1/m;
- ``heavy-tail``: as in FlexLoRA's heterogeneous setting, most clients at the lowest
  rank and a few at high ranks: ``P(r_i) ~ 1 / i^2`` (for four choices: 70%, 18%, 8%, 4%);
- ``normal``: a discretised normal centred on the middle choice (sd of one step), so
  most clients have a middle rank.

In a deployment a node may also declare its own budget (``max-lora-rank`` in its node
config); the client then trains at ``min(assigned rank, budget)``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from strategies.config import ConfigError

DISTRIBUTIONS = ("fixed", "uniform", "heavy-tail", "normal")


def parse_ranks(text: str, what: str) -> tuple[int, ...]:
    """Parse ``"2,4,8"`` into ranks (each at least 1); ``what`` names the setting."""
    try:
        ranks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated whole numbers, got '{text}'") from None
    if any(r < 1 for r in ranks):
        raise ConfigError(f"{what} must all be at least 1, got {list(ranks)}")
    return ranks


def distribution_probabilities(name: str, m: int) -> np.ndarray:
    """Probabilities of the ``m`` sorted choices under the named distribution."""
    if name not in DISTRIBUTIONS:
        raise ConfigError(
            f"unknown rank distribution '{name}'; known: {', '.join(DISTRIBUTIONS)}"
        )
    i = np.arange(1, m + 1, dtype=float)
    if name == "fixed":
        p = (i == m).astype(float)
    elif name == "uniform":
        p = np.ones(m)
    elif name == "heavy-tail":
        p = 1.0 / i**2
    else:
        p = np.exp(-0.5 * (i - (m + 1) / 2) ** 2)
    return p / p.sum()


@dataclass(frozen=True)
class RankPlan:
    """How ranks are given to clients; ``max_rank`` is the global (server) rank."""

    max_rank: int
    distribution: str = "fixed"
    choices: tuple[int, ...] = ()
    explicit: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        distribution_probabilities(self.distribution, max(len(self.choices), 1))
        for rank in (*self.choices, *self.explicit):
            if rank > self.max_rank:
                raise ConfigError(
                    f"client rank {rank} is above the maximum rank {self.max_rank} "
                    "(lora-rank); raise lora-rank or lower the client ranks"
                )

    def check_num_clients(self, n: int) -> None:
        """An explicit list must give one rank per client."""
        if self.explicit and len(self.explicit) != n:
            raise ConfigError(
                f"client-ranks lists {len(self.explicit)} ranks but there are {n} clients; "
                "give exactly one rank per client"
            )

    def assign(self, node_ids: Sequence[int], rng: random.Random) -> dict[int, int]:
        """A rank for each node: explicit ranks in sorted node-id order, else drawn."""
        nodes = sorted(node_ids)
        if self.explicit:
            self.check_num_clients(len(nodes))
            return dict(zip(nodes, self.explicit, strict=True))
        choices = sorted(self.choices) or [self.max_rank]
        p = distribution_probabilities(self.distribution, len(choices))
        return {n: rng.choices(choices, weights=list(p))[0] for n in nodes}
