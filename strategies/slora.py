"""SLoRA (Babakniya et al., 2023): a sparse fine-tuning stage, then LoRA from its SVD.

Stage 1 (``slora-rounds`` rounds): clients fine-tune the adapted base weights under a
fixed random mask of density ``slora-density`` (plus the head); only the masked values
travel, and the server averages them. Stage 2: the server takes the accumulated update
``W - W0`` of each module, initialises LoRA with its rank-r truncated SVD
(``s B A = U_r S_r V_r^T``, singular values split evenly between B and A), resets the
base weights to ``W0`` (clients apply no sparse delta from then on) and continues with
FedIT or FFA-LoRA (``slora-then``) on the new adapter. One run, both stages in its
metrics (``stage``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.base import Aggregation, LoraStrategy, Payload, RoundStats
from strategies.fedit import RunningAverage
from strategies.instructions import ClientInstructions, ConfigValue
from strategies.parts import ALL_PARTS, EXTRAS, LORA_B
from strategies.registry import register_strategy
from strategies.sparse import densify, is_sparse_key, mask_size, sparse_key
from strategies.validation import ClientUpdate

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


@register_strategy("slora")
class SLoRA(LoraStrategy):
    """Two stages in one run: sparse fine-tuning, then LoRA (FedIT or FFA-LoRA) from its SVD."""

    stage_one_parts: ClassVar[frozenset[str]] = frozenset({EXTRAS})

    def __init__(self, *, stage_rounds: int = 2, density: float = 0.01, then: str = "fedit",
                 **kwargs: Any) -> None:
        if stage_rounds < 1:
            raise ValueError(f"slora-rounds must be at least 1, got {stage_rounds}")
        mask_size((1, 1), density)  # validates the density
        if then not in THEN:
            raise ValueError(f"slora-then must be one of {THEN}, got '{then}'")
        super().__init__(**kwargs)
        self.stage_rounds = stage_rounds
        self.density = density
        self.then = then
        self.mask_seed = kwargs.get("seed", 0)

    @classmethod
    def options_from(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """``slora-rounds``, ``slora-density``, ``slora-then``."""
        stage_rounds = int(settings.get("slora-rounds", 2))
        if "num-rounds" in settings and stage_rounds >= int(settings["num-rounds"]):
            raise ValueError(
                f"slora-rounds ({stage_rounds}) must be below num-rounds "
                f"({settings['num-rounds']}): stage 2 (LoRA) needs at least one round")
        return {**super().options_from(settings),
                "stage_rounds": stage_rounds,
                "density": float(settings.get("slora-density", 0.01)),
                "then": str(settings.get("slora-then", "fedit"))}

    def stage(self, server_round: int) -> int:
        """1 during sparse fine-tuning, 2 afterwards."""
        return 1 if server_round <= self.stage_rounds else 2

    def client_payload(
        self, server_round: int, node_id: int, global_adapter: LoraAdapter
    ) -> Payload:
        """Stage 1: the head and the sparse deltas; stage 2: the LoRA strategy's payload."""
        if self.stage(server_round) == 1:
            parts = self.stage_one_parts
            train, send, download = parts, parts, parts
        else:
            train = send = self.stage_send_parts(server_round)
            download = ALL_PARTS  # A comes from the SVD, not from the seed: it travels
        instructions = ClientInstructions(
            server_round=server_round, strategy=self.name, rank=global_adapter.max_rank,
            alpha=self.lora_alpha, train_parts=train, send_parts=send,
            options=self.client_options(server_round, node_id))
        return Payload(global_adapter, instructions, download)

    def client_options(self, server_round: int, node_id: int) -> dict[str, ConfigValue]:
        """Tells stage-1 clients to train the masked base weights."""
        return {"sparse-base": True} if self.stage(server_round) == 1 else {}

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        """Add zero deltas before stage 1; switch to the SVD-initialised LoRA at stage 2."""
        from strategies.wire import adapter_to_record, record_to_adapter

        adapter = record_to_adapter(arrays, self.lora_alpha)
        has_deltas = any(is_sparse_key(k) for k in adapter.extras)
        if self.stage(server_round) == 1 and not has_deltas:
            adapter = self.with_zero_deltas(adapter)
        elif self.stage(server_round) == 2 and has_deltas:
            adapter = stage_two_adapter(adapter, self.mask_seed)
        return super().configure_train(server_round, adapter_to_record(adapter), config, grid)

    def with_zero_deltas(self, adapter: LoraAdapter) -> LoraAdapter:
        """The adapter with an all-zero sparse delta per module (the start of stage 1)."""
        extras = dict(adapter.extras)
        for name, f in adapter.modules.items():
            size = mask_size((f.out_features, f.in_features), self.density)
            extras[sparse_key(name)] = np.zeros(size, dtype=np.float32)
        return LoraAdapter(adapter.modules, adapter.alpha, extras)

    def stage_send_parts(self, server_round: int) -> frozenset[str]:
        """The parts clients send back in this round's stage."""
        if self.stage(server_round) == 1:
            return self.stage_one_parts
        return frozenset({LORA_B, EXTRAS}) if self.then == "ffa-lora" else ALL_PARTS

    def start_aggregation(self, server_round: int, global_adapter: LoraAdapter) -> Aggregation:
        """A running data-size weighted average of what this stage's clients send."""
        stats = self.history.setdefault(server_round, RoundStats(round=server_round))
        stats.metrics["stage"] = float(self.stage(server_round))
        return RunningAverage(global_adapter, self.stage_send_parts(server_round))

    def aggregate_adapters(
        self, server_round: int, global_adapter: LoraAdapter, updates: Sequence[ClientUpdate]
    ) -> LoraAdapter:
        """Data-size weighted average of what clients sent (deltas and head, or LoRA)."""
        aggregation = self.start_aggregation(server_round, global_adapter)
        for update in updates:
            aggregation.add(update)
        return aggregation.result()
