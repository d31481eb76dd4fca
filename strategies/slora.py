"""SLoRA (Babakniya et al., 2023): a sparse fine-tuning stage, then LoRA from its SVD.

Stage 1 (``slora-rounds`` rounds): clients fine-tune the adapted base weights under a
fixed random mask of density ``slora-density`` (plus the head); only the masked values
travel, and the server averages them. Stage 2: the server takes the accumulated update
``W - W0`` of each module, initialises LoRA with its rank-r truncated SVD
(``s B A = U_r S_r V_r^T``, singular values split evenly between B and A), resets the
base weights to ``W0`` (clients apply no sparse delta from then on) and continues with
the registered strategy named by ``slora-then`` (FedIT or FFA-LoRA) on the new adapter,
to which it delegates what each node receives and how updates combine. One run, both
stages in its metrics (``stage``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flwr.serverapp import Grid

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.aggregation import Aggregation
from strategies.base import LoraStrategy
from strategies.config import StrategyConfig, check, setting
from strategies.fedit import RunningAverage
from strategies.instructions import ClientInstructions
from strategies.messaging import Payload
from strategies.parts import ALL_PARTS, BASE, EXTRAS
from strategies.registry import get_strategy_class, register_strategy
from strategies.round_stats import RoundStats
from strategies.sparse import densify, is_sparse_key, mask_size, sparse_key

THEN = ("fedit", "ffa-lora")
DENSE_SVD_LIMIT = 4_000_000  # above this many entries, a sparse truncated SVD is used


def lora_from_update(delta: np.ndarray, rank: int, scale: float) -> LoraFactors:
    """LoRA factors with ``scale * B @ A`` the best rank-``rank`` approximation of ``delta``."""
    rank = min(rank, *delta.shape)
    if delta.size <= DENSE_SVD_LIMIT:
        U, S, Vt = np.linalg.svd(delta, full_matrices=False)
        U, S, Vt = U[:, :rank], S[:rank], Vt[:rank]
    else:
        from scipy.sparse import csr_matrix
        from scipy.sparse.linalg import svds

        U, S, Vt = svds(csr_matrix(delta), k=rank)
        order = np.argsort(S)[::-1]
        U, S, Vt = U[:, order], S[order], Vt[order]
    root = np.sqrt(S / scale)
    return LoraFactors(A=(root[:, None] * Vt).astype(np.float32),
                       B=(U * root).astype(np.float32))


def stage_two_adapter(global_adapter: LoraAdapter, seed: int) -> LoraAdapter:
    """The LoRA adapter initialised from the stage-1 sparse deltas; deltas dropped.

    The rank of each module stays that of the global adapter (``lora-rank``).
    """
    modules = {}
    for name, factors in global_adapter.modules.items():
        delta = global_adapter.extras.get(sparse_key(name))
        shape = (factors.out_features, factors.in_features)
        if delta is None:
            modules[name] = factors
            continue
        dense = densify(delta, name, shape, seed)
        fitted = lora_from_update(dense, factors.rank, global_adapter.scale(name))
        if fitted.rank < factors.rank:  # rank above min(out, in): pad with zeros
            pad = factors.rank - fitted.rank
            fitted = LoraFactors(A=np.vstack([fitted.A, np.zeros((pad, shape[1]), np.float32)]),
                                 B=np.hstack([fitted.B, np.zeros((shape[0], pad), np.float32)]))
        modules[name] = fitted
    extras = {k: v for k, v in global_adapter.extras.items() if not is_sparse_key(k)}
    return LoraAdapter(modules=modules, alpha=global_adapter.alpha, extras=extras)


@dataclass(frozen=True)
class SLoRAConfig(StrategyConfig):
    """SLoRA's settings: the sparse stage's length and density, and the stage-2 strategy."""

    slora_rounds: int = setting(2, "rounds of sparse fine-tuning before LoRA starts")
    slora_density: float = setting(0.01, "share of each adapted weight the sparse stage trains")
    slora_then: str = setting("fedit", "the LoRA strategy of stage 2: fedit | ffa-lora")

    def __post_init__(self) -> None:
        check(self.slora_rounds >= 1, f"slora-rounds must be at least 1, got {self.slora_rounds}")
        mask_size((1, 1), self.slora_density)  # validates the density
        check(self.slora_then in THEN,
              f"slora-then must be one of {THEN}, got '{self.slora_then}'")

    def check_run(self, *, num_rounds: int, lora_rank: int,
                  num_clients: int | None = None) -> None:
        """Stage 2 needs at least one round."""
        check(self.slora_rounds < num_rounds,
              f"slora-rounds ({self.slora_rounds}) must be below num-rounds ({num_rounds}): "
              "stage 2 (LoRA) needs at least one round")


@register_strategy("slora")
class SLoRA(LoraStrategy):
    """Two stages in one run: sparse fine-tuning, then a LoRA strategy from its SVD."""

    config_class = SLoRAConfig
    config: SLoRAConfig
    stage_one_parts: ClassVar[frozenset[str]] = frozenset({EXTRAS, BASE})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        common = {k: v for k, v in kwargs.items() if k != "config"}
        self.stage_two: LoraStrategy = get_strategy_class(self.config.slora_then)(**common)
        self.stage_two.history = self.history  # one record of the run's rounds
        self.stage_two.sampler = self.sampler

    @property
    def individual_updates_visible(self) -> bool:  # type: ignore[override]
        """Whether the server sees each update; stage 2's strategy follows it."""
        return self.stage_two.individual_updates_visible

    @individual_updates_visible.setter
    def individual_updates_visible(self, value: bool) -> None:
        self.stage_two.individual_updates_visible = value

    @property
    def mask_seed(self) -> int:
        """The seed of the sparse masks (the run seed, as the clients' runtimes use)."""
        return self.seed

    def stage(self, server_round: int) -> int:
        """1 during sparse fine-tuning, 2 afterwards."""
        return 1 if server_round <= self.config.slora_rounds else 2

    def prepare_global(self, server_round: int, global_adapter: LoraAdapter,
                       grid: Grid) -> LoraAdapter:
        """Add zero deltas before stage 1; switch to the SVD-initialised LoRA at stage 2."""
        has_deltas = any(is_sparse_key(k) for k in global_adapter.extras)
        if self.stage(server_round) == 1 and not has_deltas:
            return self.with_zero_deltas(global_adapter)
        if self.stage(server_round) == 2 and has_deltas:
            return stage_two_adapter(global_adapter, self.mask_seed)
        return global_adapter

    def client_payload(
        self, server_round: int, node_id: int, global_adapter: LoraAdapter
    ) -> Payload:
        """Stage 1: the head and the sparse deltas; stage 2: the LoRA strategy's payload."""
        if self.stage(server_round) == 1:
            parts = self.stage_one_parts
            instructions = ClientInstructions(
                server_round=server_round, strategy=self.name, rank=global_adapter.max_rank,
                alpha=self.lora_alpha, train_parts=parts, send_parts=parts,
                options=self.client_options(server_round, node_id))
            return Payload(global_adapter, instructions, parts)
        payload = self.stage_two.client_payload(server_round, node_id, global_adapter)
        # A comes from the SVD, not from the seed: it travels even when stage 2 freezes it
        return Payload(payload.adapter, dataclasses.replace(payload.instructions,
                                                            strategy=self.name), ALL_PARTS)

    def start_aggregation(self, server_round: int, global_adapter: LoraAdapter) -> Aggregation:
        """Stage 1: a running average of the deltas and head; stage 2: the LoRA strategy's."""
        stats = self.history.setdefault(server_round, RoundStats(round=server_round))
        stats.metrics["stage"] = float(self.stage(server_round))
        if self.stage(server_round) == 1:
            return RunningAverage(global_adapter, self.stage_one_parts)
        return self.stage_two.start_aggregation(server_round, global_adapter)

    def with_zero_deltas(self, adapter: LoraAdapter) -> LoraAdapter:
        """The adapter with an all-zero sparse delta per module (the start of stage 1)."""
        extras = dict(adapter.extras)
        for name, f in adapter.modules.items():
            size = mask_size((f.out_features, f.in_features), self.config.slora_density)
            extras[sparse_key(name)] = np.zeros(size, dtype=np.float32)
        return LoraAdapter(adapter.modules, adapter.alpha, extras)
