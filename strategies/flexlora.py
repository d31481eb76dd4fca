"""FlexLoRA (Bai et al., NeurIPS 2024): aggregate full-size updates, redistribute by SVD.

The server forms ``dW = sum_k p_k s B_k A_k`` per module (data-size weights ``p_k``, the
common scale ``s = alpha / r_max``) and keeps its top-``r_max`` SVD as the global
adapter; a client of rank ``r_k`` receives the top-``r_k`` part, which is exactly the
rank-``r_k`` truncation of ``dW``. The SVD never forms the d x k matrix unless that is
cheapest: :func:`strategies.flexlora_math.flexlora_svd` picks, from the layer size, the
total client rank ``R`` and ``r_max``, the factored SVD (QR of the stacked factors, SVD of
the small core; few clients) or a certified randomized block Krylov SVD of the implicit
sum (many clients, large ``R``).

Where the singular values go is the ``flexlora-split`` setting: ``B`` puts them all in
B (``B = U S / s``, ``A = V^T``), as in the authors' code; ``sqrt`` splits them
(``B = U sqrt(S/s)``, ``A = sqrt(S/s) V^T``), which balances the factor norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.config import check, setting
from strategies.fedit import normalized_weights, weighted_mean
from strategies.flexlora_math import SPLIT_MODES, flexlora_svd, split_singular_values
from strategies.hetero import HeteroRankStrategy, RankConfig
from strategies.registry import register_strategy
from strategies.validation import ClientUpdate


def flexlora_aggregate(
    adapters: Sequence[LoraAdapter], num_examples: Sequence[int], *, rank: int, alpha: float,
    split: str = "B", svd_method: str = "auto",
) -> LoraAdapter:
    """The global adapter (rank ``rank``, alpha ``alpha``) from clients of mixed ranks.

    Each client's module update is ``scale_k B_k A_k`` with its own ``scale_k``; the
    result's ``(alpha / rank) B A`` is the best rank-``rank`` approximation of the
    weighted sum of those updates. Extras are averaged by data size. ``svd_method``
    overrides the automatic SVD path (see :func:`strategies.flexlora_math.flexlora_svd`).
    """
    if split not in SPLIT_MODES:
        raise ValueError(f"flexlora-split must be one of {SPLIT_MODES}, got '{split}'")
    p = normalized_weights(num_examples)
    scale = alpha / rank
    modules = {}
    for name in adapters[0].modules:
        Bs = [a.modules[name].B for a in adapters]
        As = [a.modules[name].A for a in adapters]
        coeffs = [float(w) * a.scale(name) for w, a in zip(p, adapters, strict=True)]
        U, S, Vt = flexlora_svd(Bs, As, coeffs, rank, method=svd_method)
        factors = split_singular_values(U, S / scale, Vt, rank, split)
        dtype = adapters[0].modules[name].A.dtype
        modules[name] = LoraFactors(A=factors.A.astype(dtype), B=factors.B.astype(dtype))
    extras = {k: weighted_mean([a.extras[k] for a in adapters], p) for k in adapters[0].extras}
    return LoraAdapter(modules=modules, alpha=alpha, extras=extras)


@dataclass(frozen=True)
class FlexLoRAConfig(RankConfig):
    """FlexLoRA's settings, beside the rank plan's."""

    flexlora_split: str = setting(
        "B", "where the singular values go: B (all in B, the authors' code) | sqrt (split)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.flexlora_split in SPLIT_MODES,
              f"flexlora-split must be one of {SPLIT_MODES}, got '{self.flexlora_split}'")


@register_strategy("flexlora")
class FlexLoRA(HeteroRankStrategy):
    """Heterogeneous ranks; the server aggregates products and redistributes by SVD."""

    config_class = FlexLoRAConfig
    config: FlexLoRAConfig

    exact_rank = False  # a node with a smaller rank budget may train below its rank
    secure_aggregation_refusal = (
        "its global adapter is an SVD of the weighted sum of the clients' products "
        "B_k A_k, which is not linear in the factors they send; a secure sum of the "
        "products would need each client's dense d x k matrices. Use hetlora with "
        "hetlora-weighting=data-size (heterogeneous ranks) or fedit")
    client_dp_refusal = (
        "its global adapter is an SVD of the sum of the clients' products B_k A_k, which is "
        "not linear in the factors, so clipping a client's factors does not bound its effect "
        "on the aggregate and noise on the factors is not the Gaussian mechanism; use hetlora "
        "(heterogeneous ranks) or fedit with client-level DP")
    coordinate_wise_refusal = (
        "it sums the clients' products s B_k A_k and re-factors the sum by SVD; a "
        "coordinate-wise median or trimmed mean of the factors is not a robust version of "
        "that sum (a product's coordinates mix every factor coordinate), and one of the "
        "products would need the dense d x k matrices the factored SVD avoids. Use "
        "aggregator=norm-clip or mean (with update-norm-bound) for flexlora, or hetlora "
        "with median / trimmed-mean")

    def aggregate_adapters(
        self, server_round: int, global_adapter: LoraAdapter, updates: Sequence[ClientUpdate]
    ) -> LoraAdapter:
        """Top-``r_max`` SVD of the weighted sum of the clients' scaled updates."""
        adapters = [u.adapter for u in updates if u.adapter is not None]
        result = flexlora_aggregate(
            adapters, [u.num_examples for u in updates], rank=global_adapter.max_rank,
            alpha=global_adapter.alpha, split=self.config.flexlora_split)
        self.history[server_round].metrics["rank-sum"] = float(
            sum(a.max_rank for a in adapters))
        return result
