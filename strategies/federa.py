"""FeDeRA (Yan et al., 2024): LoRA initialised from the SVD of the pretrained weights.

For every target module with pretrained weight ``W = U S V^T``, the adapter starts at
the top-``r`` singular triplets, split evenly between the factors,

    B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T,   so  s B A = U_r S_r V_r^T,

instead of LoRA's random A and zero B, and the frozen base weight becomes the residual
``W - s B A`` (the dense ``<module>.base_delta`` of ``-s B A``, the ``base`` part), so the
initial model computes exactly what the pretrained one does. From then on the run is
FedIT: the factors are averaged by data size each round.

The paper has each client decompose its own copy of the weights; fedlora's server does
it once (``initial_global``, on the weights the server's model holds) and the residual
travels with the factors, so every client and the server's evaluation apply the same
one. ``base-delta-bytes`` is what that residual costs per client per round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import INFO

import numpy as np
from flwr.supercore import log

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.fedit import FedIT
from strategies.registry import register_strategy
from strategies.round_stats import RoundStats
from strategies.sparse import dense_key, is_dense_key


def svd_factors(weight: np.ndarray, rank: int, scale: float) -> LoraFactors:
    """Factors with ``scale * B @ A`` the best rank-``rank`` approximation of ``weight``.

    Ranks above ``min(out, in)`` get zero rows and columns. The decomposition runs with
    one BLAS thread: in a long-lived server process that also runs torch and Ray, LAPACK's
    SVD on OpenBLAS's thread pool was seen to slow down by three orders of magnitude
    (minutes for a 384 x 384 matrix); single-threaded it takes milliseconds.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        U, S, Vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    k = min(rank, len(S))
    root = np.sqrt(S[:k] / scale)
    A = np.zeros((rank, weight.shape[1]))
    B = np.zeros((weight.shape[0], rank))
    A[:k] = root[:, None] * Vt[:k]
    B[:, :k] = U[:, :k] * root
    return LoraFactors(A=A.astype(np.float32), B=B.astype(np.float32))


@register_strategy("federa")
class FeDeRA(FedIT):
    """FedIT from an SVD initialisation of every adapted module, residual in the base."""

    def initial_global(self, adapter: LoraAdapter,
                       base_weights: Callable[[], Mapping[str, np.ndarray]]) -> LoraAdapter:
        """The SVD factors of every module's pretrained weight, and the residual deltas."""
        started = time.monotonic()
        weights = base_weights()
        missing = sorted(set(adapter.modules) - set(weights))
        if missing:
            raise ValueError(f"federa: no pretrained weight for adapted module(s) {missing[:3]}")
        modules, extras = {}, dict(adapter.extras)
        for name, f in adapter.modules.items():
            weight = weights[name]
            if weight.shape != (f.out_features, f.in_features):
                raise ValueError(f"federa: {name}'s weight is {weight.shape}, its adapter "
                                 f"needs {(f.out_features, f.in_features)}")
            scale = adapter.scale(name)
            factors = svd_factors(weight, f.rank, scale)
            modules[name] = factors
            product = scale * (factors.B.astype(np.float64) @ factors.A.astype(np.float64))
            extras[dense_key(name)] = (-product).astype(np.float32)
        log(INFO, "federa: LoRA initialised from the SVD of %d pretrained weights in %.2f s",
            len(modules), time.monotonic() - started)
        return LoraAdapter(modules, adapter.alpha, extras)

    def after_aggregation(self, server_round: int, global_adapter: LoraAdapter,
                          aggregation: object) -> None:
        """What the residual costs on the wire, per client, this round."""
        stats = self.history.setdefault(server_round, RoundStats(round=server_round))
        stats.metrics["base-delta-bytes"] = float(sum(
            v.nbytes for k, v in global_adapter.extras.items() if is_dense_key(k)))
