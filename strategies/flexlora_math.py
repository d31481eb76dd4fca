"""FlexLoRA's pure numpy math (Bai et al., NeurIPS 2024): SVD of the aggregated update.

The server forms ``dW = sum_k p_k s_k B_k A_k`` (``s_k = alpha / r_k``) and gives each
client the rank-``r_k`` truncated SVD of ``dW``. :func:`factored_svd` computes that SVD
without materialising the ``d x k`` matrix: with ``R = sum_k r_k`` it costs
``O((d + k) R^2 + R^3)`` instead of ``O(d k min(d, k))``. :func:`dense_svd` is the slow
reference.

No Flower and no torch here: only numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.hetlora_math import check_weights

SPLIT_MODES = ("B", "sqrt")


def _check_factors(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], coeffs: Sequence[float], rank: int
) -> tuple[int, int]:
    """Validate the inputs of an SVD and return ``(d, k)``."""
    if not (len(Bs) == len(As) == len(coeffs)) or not Bs:
        raise ValueError(
            f"need as many B's, A's and coefficients (at least one), got "
            f"{len(Bs)}, {len(As)} and {len(coeffs)}"
        )
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    d, k = Bs[0].shape[0], As[0].shape[1]
    for i, (b, a) in enumerate(zip(Bs, As, strict=True)):
        if b.ndim != 2 or a.ndim != 2 or b.shape[0] != d or a.shape[1] != k:
            raise ValueError(
                f"client {i}: B{b.shape} and A{a.shape} do not fit a {d} x {k} update"
            )
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"client {i}: B{b.shape} and A{a.shape} have different ranks")
    if not np.isfinite(np.asarray(coeffs, dtype=np.float64)).all():
        raise ValueError(f"coefficients must be finite, got {list(coeffs)}")
    return d, k


def _orthonormal_completion(q: np.ndarray, extra: int) -> np.ndarray:
    """``extra`` orthonormal columns orthogonal to the orthonormal columns of ``q``.

    Deterministic (fixed seed): project a Gaussian block onto the orthogonal complement of
    ``q`` (twice, for numerical orthogonality) and orthonormalise it with QR. Needs
    ``q.shape[1] + extra <= q.shape[0]``.
    """
    g = np.random.default_rng(0).standard_normal((q.shape[0], extra))
    for _ in range(2):
        g -= q @ (q.T @ g)
    basis, _ = np.linalg.qr(g)
    return basis


def _pad_triplets(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncate or pad an SVD ``(u, s, vt)`` with ``m`` triplets to exactly ``rank``.

    Padded singular values are zero. Padded singular vectors are an orthonormal completion
    of ``u`` and ``vt`` up to ``min(rank, d, k)`` triplets (so a client that receives them
    in its ``A`` factor can still train those directions), and zero beyond.
    """
    m = s.shape[0]
    if rank <= m:
        return u[:, :rank], s[:rank], vt[:rank, :]
    d, k = u.shape[0], vt.shape[1]
    n_orth = min(rank, d, k) - m
    u_parts, vt_parts = [u], [vt]
    if n_orth > 0:
        u_parts.append(_orthonormal_completion(u, n_orth))
        vt_parts.append(_orthonormal_completion(vt.T, n_orth).T)
    n_zero = rank - m - max(n_orth, 0)
    if n_zero > 0:
        u_parts.append(np.zeros((d, n_zero)))
        vt_parts.append(np.zeros((n_zero, k)))
    s_full = np.concatenate([s, np.zeros(rank - m)])
    return np.hstack(u_parts), s_full, np.vstack(vt_parts)


def factored_svd(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], coeffs: Sequence[float], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD of ``M = sum_k c_k B_k A_k`` without forming the ``d x k`` matrix.

    ``M = U0 V0^T`` with ``U0 = [sqrt|c_k| B_k ...]`` (``d x R``) and
    ``V0 = [sign(c_k) sqrt|c_k| A_k^T ...]`` (``k x R``), ``R = sum_k r_k``. Reduced QR of
    both, ``U0 = Qu Ru`` and ``V0 = Qv Rv``, gives ``M = Qu (Ru Rv^T) Qv^T``; the SVD of
    the small core ``Ru Rv^T = Uc S Vct`` gives ``M = (Qu Uc) S (Vct Qv^T)``.

    ``R > min(d, k)`` needs no dense fallback: reduced QR then yields ``Ru`` of shape
    ``min(d, R) x R`` and ``Rv`` of ``min(k, R) x R``, so the core is
    ``min(d, R) x min(k, R)`` and the SVD has ``min(d, k, R)`` triplets, exactly those of
    ``M``. Rank-deficient and all-zero inputs give (exactly or numerically) zero singular
    values, with orthonormal singular vectors and no NaN.

    Everything is computed in float64, whatever the input dtype.

    Args:
        Bs: ``B_k``, each ``d x r_k``.
        As: ``A_k``, each ``r_k x k``.
        coeffs: ``c_k``, any sign (FlexLoRA uses ``p_k * alpha / r_k``).
        rank: the number of triplets to return, ``>= 1``.

    Returns:
        ``(U, S, Vt)``: ``U`` is ``d x rank``, ``S`` has ``rank`` non-increasing values,
        ``Vt`` is ``rank x k``; float64. If ``rank`` exceeds ``min(d, k, R)`` the extra
        singular values are zero, their singular vectors complete ``U`` and ``Vt``
        orthonormally up to ``min(d, k)`` triplets and are zero beyond that.

    Raises:
        ValueError: mismatched lengths or shapes, no clients, ``rank < 1`` or non-finite
            coefficients.

    """
    _check_factors(Bs, As, coeffs, rank)
    c = np.asarray(coeffs, dtype=np.float64)
    root = np.sqrt(np.abs(c))
    u0 = np.hstack([r * b.astype(np.float64) for r, b in zip(root, Bs, strict=True)])
    v0 = np.hstack(
        [s * r * a.astype(np.float64).T for s, r, a in zip(np.sign(c), root, As, strict=True)]
    )
    qu, ru = np.linalg.qr(u0)
    qv, rv = np.linalg.qr(v0)
    uc, s, vct = np.linalg.svd(ru @ rv.T, full_matrices=False)
    keep = min(rank, s.shape[0])  # map back only the triplets that are returned
    return _pad_triplets(qu @ uc[:, :keep], s[:keep], vct[:keep] @ qv.T, rank)


def dense_svd(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], coeffs: Sequence[float], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slow reference for :func:`factored_svd`: form ``M`` densely and take its SVD.

    Same arguments, return value and padding as :func:`factored_svd` (float64).
    """
    d, k = _check_factors(Bs, As, coeffs, rank)
    m = np.zeros((d, k), dtype=np.float64)
    for c, b, a in zip(coeffs, Bs, As, strict=True):
        m += float(c) * (b.astype(np.float64) @ a.astype(np.float64))
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return _pad_triplets(u, s, vt, rank)


def split_singular_values(
    U: np.ndarray, S: np.ndarray, Vt: np.ndarray, rank: int, mode: str
) -> LoraFactors:
    """LoRA factors of rank ``rank`` from the top-``rank`` singular triplets.

    Mode ``"B"`` puts the singular values into ``B`` (``B = U_r diag(S_r)``,
    ``A = Vt_r``, as in the FlexLoRA authors' code); mode ``"sqrt"`` splits them
    (``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vt_r``). Either way ``B @ A = U_r S_r Vt_r``.

    The factors represent the UNSCALED product: a client with LoRA scale
    ``s = alpha / rank`` computes ``s * B @ A``, so to make the client's update equal
    ``U_r S_r Vt_r`` the caller divides ``B`` (or the product) by ``s``. Arrays keep the
    dtype of ``U``, ``S``, ``Vt`` (float64 from :func:`factored_svd`); cast as needed.

    Args:
        U: left singular vectors, ``d x m``.
        S: singular values, ``m``, non-negative.
        Vt: right singular vectors, ``m x k``.
        rank: the client's rank, ``1 <= rank <= m``.
        mode: ``"B"`` or ``"sqrt"``.

    Returns:
        Factors with ``A`` of shape ``rank x k`` and ``B`` of shape ``d x rank``.

    Raises:
        ValueError: unknown ``mode``, or ``rank`` outside ``[1, m]``.

    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode {mode!r}; expected one of {list(SPLIT_MODES)}")
    if rank < 1 or rank > S.shape[0]:
        raise ValueError(f"rank must be between 1 and {S.shape[0]}, got {rank}")
    u, s, vt = U[:, :rank], S[:rank], Vt[:rank, :]
    if mode == "B":
        return LoraFactors(A=vt.copy(), B=u * s)
    root = np.sqrt(np.maximum(s, 0.0))
    return LoraFactors(A=root[:, None] * vt, B=u * root)


def flexlora_module_update(
    adapters: Sequence[LoraAdapter], weights: np.ndarray, module: str
) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """The inputs of :func:`factored_svd` for one module.

    Args:
        adapters: the clients' adapters.
        weights: normalised weights ``p_k``, one per adapter (see
            :func:`~strategies.hetlora_math.check_weights`).
        module: the module name.

    Returns:
        ``(Bs, As, coeffs)`` with ``coeffs[k] = p_k * alpha_k / r_k`` (the client's own
        LoRA scale of that module); the factor arrays are the adapters' own (not copied).

    Raises:
        ValueError: bad weights, no adapters, or an adapter without ``module``.

    """
    if not adapters:
        raise ValueError("flexlora_module_update needs at least one adapter")
    w = check_weights(weights, len(adapters))
    bs: list[np.ndarray] = []
    as_: list[np.ndarray] = []
    coeffs: list[float] = []
    for i, (p, a) in enumerate(zip(w, adapters, strict=True)):
        if module not in a.modules:
            raise ValueError(f"adapter {i} has no module {module!r}")
        f = a.modules[module]
        bs.append(f.B)
        as_.append(f.A)
        coeffs.append(float(p) * a.scale(module))
    return bs, as_, coeffs
