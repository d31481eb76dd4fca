"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters, merge, start afresh.

Each round, every client trains a fresh LoRA adapter at its own rank ``r_k`` (the rank
plan of ``hetlora``/``flexlora``: ``rank-distribution``, ``rank-choices``,
``client-ranks``). The server stacks the clients' factors,

    B_stack = [p_1 s B_1 | ... | p_K s B_K],   A_stack = [A_1; ...; A_K],

so that ``B_stack A_stack = sum_k p_k s B_k A_k`` exactly (data-size weights ``p_k``, the
common scale ``s = alpha / r_max``), whatever the ranks. The stack is merged into the
frozen base weight of every module (the dense ``<module>.base_delta``, the ``base``
part) and the next round starts from a fresh adapter: A drawn as PEFT initialises it
(Kaiming-uniform, bound ``1 / sqrt(in)``, seeded by the run seed and the round) and
B = 0, so every client's model starts at the aggregate exactly.

The paper's server sends the stacked factors and lets clients merge them into weights
they keep; fedlora's clients are stateless between rounds (a deployed node starts a
fresh process per message), so the server sends the merged dense delta instead. The
round's ``base-delta-bytes`` is what that costs; ``stacked-bytes`` is what the round's
stack alone would cost on the wire (it grows with the number of clients and their
ranks, and a stateless client would need every round's). ``agg-error-*`` is the error
of the merged float32 delta against the exact float64 sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.fedex_lora import relative_norm
from strategies.fedit import normalized_weights, weighted_mean
from strategies.hetero import HeteroRankStrategy
from strategies.parts import ADAPTER_PARTS, ALL_PARTS
from strategies.registry import register_strategy
from strategies.sparse import dense_key, is_base_key
from strategies.validation import ClientUpdate


def fresh_factors(rank: int, out_features: int, in_features: int,
                  rng: np.random.Generator) -> LoraFactors:
    """A new adapter module as PEFT initialises one: Kaiming-uniform A, zero B."""
    bound = 1.0 / np.sqrt(in_features)
    return LoraFactors(A=rng.uniform(-bound, bound, (rank, in_features)).astype(np.float32),
                       B=np.zeros((out_features, rank), dtype=np.float32))


def stack(adapters: Sequence[LoraAdapter], weights: np.ndarray,
          name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(B_stack, A_stack)`` of one module: ``B_stack @ A_stack = sum_k w_k s_k B_k A_k``."""
    Bs = [float(w) * a.scale(name) * a.modules[name].B.astype(np.float64)
          for w, a in zip(weights, adapters, strict=True)]
    As = [a.modules[name].A.astype(np.float64) for a in adapters]
    return np.hstack(Bs), np.vstack(As)


@register_strategy("flora")
class FLoRA(HeteroRankStrategy):
    """Stacked (exact, any ranks) aggregation merged into the base; a fresh adapter each round."""

    exact_rank = False  # a node with a smaller rank budget may train below its rank
    train_parts: ClassVar[frozenset[str]] = ADAPTER_PARTS
    send_parts: ClassVar[frozenset[str]] = ADAPTER_PARTS
    download_parts: ClassVar[frozenset[str]] = ALL_PARTS  # the fresh adapter and the merged base
    secure_aggregation_refusal = (
        "it stacks every client's factors side by side, so the server holds each "
        "client's B_k and A_k by construction; use fedit, ffa-lora or hetlora with "
        "hetlora-weighting=data-size")
    client_dp_refusal = (
        "it merges the sum of the clients' products B_k A_k into the base, which clipping "
        "the factors does not bound and noise on averaged factors does not cover; use fedit "
        "or ffa-lora with client-level DP")
    coordinate_wise_refusal = (
        "it sums the clients' products; a coordinate-wise median or trimmed mean of factors "
        "trained from a fresh start is not a robust version of that sum; use "
        "aggregator=norm-clip or mean (with update-norm-bound)")

    def aggregate_adapters(
        self, server_round: int, global_adapter: LoraAdapter, updates: Sequence[ClientUpdate]
    ) -> LoraAdapter:
        """Merge the stacked updates into the base deltas; a fresh adapter for the next round."""
        adapters = [u.adapter for u in updates if u.adapter is not None]
        weights = normalized_weights([u.num_examples for u in updates])
        rng = np.random.default_rng([self.seed, server_round + 1])
        modules, extras = {}, {}
        errors, stacked_bytes = {}, 0
        for name, f in global_adapter.modules.items():
            B_stack, A_stack = stack(adapters, weights, name)
            merged = B_stack @ A_stack
            key = dense_key(name)
            previous = global_adapter.extras.get(key)
            total = merged if previous is None else previous.astype(np.float64) + merged
            extras[key] = total.astype(np.float32)
            applied = extras[key].astype(np.float64) - (
                0.0 if previous is None else previous.astype(np.float64))
            errors[name] = relative_norm(applied - merged, merged)
            stacked_bytes += 4 * (B_stack.size + A_stack.size)
            modules[name] = fresh_factors(f.rank, f.out_features, f.in_features, rng)
        for key in global_adapter.extras:
            if not is_base_key(key):  # the head: averaged by data size
                extras[key] = weighted_mean([a.extras[key] for a in adapters], weights)
        stats = self.history[server_round]
        stats.details["aggregation_error"] = errors
        stats.metrics.update({
            "agg-error-mean": float(np.mean(list(errors.values()))) if errors else 0.0,
            "agg-error-max": float(np.max(list(errors.values()))) if errors else 0.0,
            "rank-sum": float(sum(a.max_rank for a in adapters)),
            "stacked-bytes": float(stacked_bytes),
            "base-delta-bytes": float(sum(v.nbytes for k, v in extras.items()
                                          if is_base_key(k))),
        })
        return LoraAdapter(modules, global_adapter.alpha, extras)
