"""HetLoRA's pure numpy math (Cho et al., 2024): heterogeneous ranks, sparsity weights, pruning.

Clients train at ranks ``r_k <= r_max``. The server sends the global factors truncated to
``r_k`` (:func:`truncate_adapter`), zero-pads every returned update to ``r_max``
(:func:`pad_adapter`) and averages the padded factors with sparsity weights
``p_k ~ ||s_k B_k A_k||_F`` (:func:`sparsity_weights`, :func:`hetlora_aggregate`).
Clients may shrink their rank when the tail of their factors carries little
(:func:`tail_norms`, :func:`pruned_rank`).

Zero-padding keeps the unscaled product ``B @ A`` unchanged, but the LoRA scale of a
module is ``alpha / rank``, so a padded module's scaled update changes by ``r_k / r_max``;
which scale to apply to the aggregate is the caller's decision.

No Flower and no torch here: only numpy on :class:`~strategies.adapter.LoraAdapter`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.fedit import weighted_average_adapters

_WEIGHT_SUM_TOL = 1e-6


def truncate_factors(f: LoraFactors, rank: int) -> LoraFactors:
    """Keep the first ``rank`` rows of ``A`` and the first ``rank`` columns of ``B``.

    Args:
        f: the factors of one module.
        rank: the new rank, ``1 <= rank <= f.rank``.

    Returns:
        New factors (copies) of rank ``rank``.

    Raises:
        ValueError: ``rank`` is below 1 or above the current rank.

    """
    if rank < 1 or rank > f.rank:
        raise ValueError(f"cannot truncate factors of rank {f.rank} to rank {rank}")
    return LoraFactors(A=f.A[:rank, :].copy(), B=f.B[:, :rank].copy())


def pad_factors(f: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad ``A`` with rows and ``B`` with columns up to ``rank``.

    The unscaled product ``B @ A`` is unchanged.

    Args:
        f: the factors of one module.
        rank: the new rank, ``rank >= f.rank``.

    Returns:
        New factors (copies, same dtype) of rank ``rank``.

    Raises:
        ValueError: ``rank`` is below the current rank.

    """
    if rank < f.rank:
        raise ValueError(f"cannot pad factors of rank {f.rank} to the smaller rank {rank}")
    a = np.zeros((rank, f.in_features), dtype=f.A.dtype)
    b = np.zeros((f.out_features, rank), dtype=f.B.dtype)
    a[: f.rank, :] = f.A
    b[:, : f.rank] = f.B
    return LoraFactors(A=a, B=b)


def truncate_adapter(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """Truncate every module of ``adapter`` to ``rank``; extras are copied unchanged.

    Raises:
        ValueError: a module's rank is below ``rank`` (or ``rank < 1``).

    """
    return LoraAdapter(
        modules={name: truncate_factors(f, rank) for name, f in adapter.modules.items()},
        alpha=adapter.alpha,
        extras={key: value.copy() for key, value in adapter.extras.items()},
    )


def pad_adapter(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """Zero-pad every module of ``adapter`` to ``rank``; extras are copied unchanged.

    Raises:
        ValueError: a module's rank is above ``rank``.

    """
    return LoraAdapter(
        modules={name: pad_factors(f, rank) for name, f in adapter.modules.items()},
        alpha=adapter.alpha,
        extras={key: value.copy() for key, value in adapter.extras.items()},
    )


def product_norm(f: LoraFactors) -> float:
    """``||B @ A||_F`` without forming ``B @ A``.

    Uses ``||BA||_F^2 = trace((B^T B)(A A^T))``, two ``r x r`` Gram matrices computed in
    float64; a tiny negative from rounding is clamped to zero.
    """
    b = f.B.astype(np.float64, copy=False)
    a = f.A.astype(np.float64, copy=False)
    gram_b = b.T @ b
    gram_a = a @ a.T
    # trace(X Y) = sum(X * Y^T), and gram_a is symmetric.
    squared = float(np.sum(gram_b * gram_a))
    return math.sqrt(max(squared, 0.0))


def check_weights(weights: np.ndarray | Sequence[float], n: int) -> np.ndarray:
    """Validate already-normalised aggregation weights and return them as float64.

    Args:
        weights: one weight per client.
        n: the number of clients.

    Returns:
        The weights as a 1-D float64 array.

    Raises:
        ValueError: not 1-D, not of length ``n``, negative or non-finite entries, or a sum
            further than 1e-6 from one.

    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != n:
        raise ValueError(f"expected {n} weights in a 1-D array, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if abs(w.sum() - 1.0) > _WEIGHT_SUM_TOL:
        raise ValueError(f"weights must sum to 1, got sum {w.sum()!r}")
    return w


def sparsity_weights(adapters: Sequence[LoraAdapter]) -> np.ndarray:
    """HetLoRA's sparsity weights: ``p_k`` proportional to client ``k``'s update norm.

    The norm of a client is the SUM over its modules of ``||s_m B_m A_m||_F`` with
    ``s_m = alpha / rank_m`` (each module's own scaled update). An adapter has several
    modules and HetLoRA defines the weight from one update norm; summing the per-module
    Frobenius norms (rather than taking the Frobenius norm of all modules together) lets
    every module count in proportion to its own norm, so a single large module does not
    dominate quadratically. Extras (heads) do not enter the norm.

    Args:
        adapters: the clients' adapters (at least one).

    Returns:
        float64 weights summing to one; uniform weights if every norm is zero.

    Raises:
        ValueError: no adapters, or a norm is not finite.

    """
    if not adapters:
        raise ValueError("sparsity_weights needs at least one adapter")
    norms = np.array(
        [
            sum(a.scale(name) * product_norm(f) for name, f in a.modules.items())
            for a in adapters
        ],
        dtype=np.float64,
    )
    if not np.isfinite(norms).all():
        raise ValueError(f"update norms must be finite, got {norms.tolist()}")
    total = norms.sum()
    if total <= 0.0:
        return np.full(len(adapters), 1.0 / len(adapters))
    return norms / total


def hetlora_aggregate(
    adapters: Sequence[LoraAdapter], weights: np.ndarray, max_rank: int
) -> LoraAdapter:
    """Zero-pad every client's modules to ``max_rank`` and average the factors.

    ``A``, ``B`` and every extra weight are averaged with ``weights``, accumulated in
    float64 and returned in the dtype of the first client's arrays. The result has rank
    ``max_rank`` in every module and the clients' common ``alpha``.

    Args:
        adapters: the clients' adapters; same module and extra keys, same ``alpha``,
            module ranks ``<= max_rank``.
        weights: normalised weights, one per adapter (see :func:`check_weights`).
        max_rank: the global rank ``r_max``.

    Returns:
        The aggregated adapter.

    Raises:
        ValueError: no adapters, bad weights, mismatched keys or ``alpha``, or a module
            rank above ``max_rank``.

    """
    if not adapters:
        raise ValueError("hetlora_aggregate needs at least one adapter")
    w = check_weights(weights, len(adapters))
    first = adapters[0]
    for i, a in enumerate(adapters):
        if a.modules.keys() != first.modules.keys() or a.extras.keys() != first.extras.keys():
            raise ValueError(f"adapter {i} has other keys than adapter 0")
        if a.alpha != first.alpha:
            raise ValueError(f"adapter {i} has alpha {a.alpha}, adapter 0 has {first.alpha}")
    return weighted_average_adapters([pad_adapter(a, max_rank) for a in adapters], w)


def kept_rank(rank: int, gamma: float) -> int:
    """The rank a client keeps when it prunes: ``floor(gamma * rank)`` within ``[1, rank - 1]``.

    ``floor`` is taken with a 1e-9 tolerance so that ``0.7 * 10`` gives 7. For
    ``rank >= 2`` the result is clamped to ``[1, rank - 1]`` (at least one index is
    pruned, at least one is kept); for ``rank == 1`` it is 1 (nothing to prune).

    Raises:
        ValueError: ``rank < 1`` or ``gamma`` outside ``(0, 1)``.

    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
    if rank == 1:
        return 1
    return min(max(math.floor(gamma * rank + 1e-9), 1), rank - 1)


def tail_norms(f: LoraFactors, gamma: float) -> tuple[float, float]:
    """Norms of the tail of the factors, HetLoRA's rank self-pruning term.

    The tail is the indices ``i >= kept_rank(r, gamma)``, i.e. ``i >= floor(gamma * r)``
    clamped so that, for ``r >= 2``, the tail holds at least one and at most ``r - 1``
    indices. For ``r == 1`` the tail is empty and both norms are 0.

    Args:
        f: the factors of one module.
        gamma: the share of the rank kept, in ``(0, 1)``.

    Returns:
        ``(||B[:, tail]||_F, ||A[tail, :]||_F)``.

    """
    keep = kept_rank(f.rank, gamma)
    b_tail = f.B[:, keep:].astype(np.float64)
    a_tail = f.A[keep:, :].astype(np.float64)
    return float(np.linalg.norm(b_tail)), float(np.linalg.norm(a_tail))


def pruned_rank(f: LoraFactors, gamma: float, threshold: float) -> int:
    """HetLoRA's rank reduction: shrink to ``kept_rank(r, gamma)`` if the tail is small.

    The rule is relative, hence invariant to rescaling ``A`` or ``B``: shrink when
    ``||B_tail||_F * ||A_tail||_F < threshold * ||B||_F * ||A||_F`` (tail as in
    :func:`tail_norms`), otherwise keep ``r``. Rank 1 never shrinks, and all-zero
    factors keep their rank (``0 < 0`` is false: no evidence to prune).

    Args:
        f: the factors of one module.
        gamma: the share of the rank kept, in ``(0, 1)``.
        threshold: relative threshold, ``>= 0``.

    Returns:
        The new rank, ``kept_rank(r, gamma)`` or ``r``; never below 1.

    Raises:
        ValueError: ``gamma`` outside ``(0, 1)`` or a negative or non-finite ``threshold``.

    """
    if not (math.isfinite(threshold) and threshold >= 0.0):
        raise ValueError(f"threshold must be finite and non-negative, got {threshold}")
    keep = kept_rank(f.rank, gamma)
    if f.rank == 1:
        return 1
    b_tail, a_tail = tail_norms(f, gamma)
    b_all = float(np.linalg.norm(f.B.astype(np.float64)))
    a_all = float(np.linalg.norm(f.A.astype(np.float64)))
    if b_tail * a_tail < threshold * b_all * a_all:
        return keep
    return f.rank


def with_alpha(adapter: LoraAdapter, alpha: float) -> LoraAdapter:
    """The same factors and extras relabelled with another alpha (no copy)."""
    return LoraAdapter(modules=adapter.modules, alpha=alpha, extras=adapter.extras)
