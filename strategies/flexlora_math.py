"""FlexLoRA's pure numpy math (Bai et al., NeurIPS 2024): SVD of the aggregated update.

Why one module of about 560 lines: the three SVD paths (dense, factored, randomized
block Krylov with its certificate) and the choice between them are tested against each
other; keeping them in one file keeps the comparison honest.

The server forms ``dW = sum_k p_k s_k B_k A_k`` (``s_k = alpha / r_k``) and gives each
client the rank-``r_k`` truncated SVD of ``dW``. Three paths compute the top-``r`` SVD of
such a ``d x k`` sum of ``n`` products of total rank ``R = sum_k r_k``:

- :func:`factored_svd`: stack the factors, QR both sides, SVD of the ``R x R`` core;
  exact, ``O((d + k) R^2 + R^3)``, the best while ``R`` is small;
- :func:`randomized_svd`: a randomized block Krylov method on the implicit operator
  ``M = U0 V0^T`` (only products with thin blocks, never an ``R x R`` or ``d x k``
  matrix), ``O((d + k) R r)`` per step; certified to a tolerance (see there), the best
  when many clients make ``R`` large (FlexLoRA samples about 80 a round);
- :func:`dense_svd`: form ``M`` and take its full SVD, ``O(d k min(d, k))``; the slow
  reference.

:func:`flexlora_svd` picks the path with the smallest estimated cost
(:func:`svd_costs`). No Flower and no torch here: only numpy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.hetlora_math import check_weights

SPLIT_MODES = ("B", "sqrt")
SVD_METHODS = ("auto", "factored", "randomized", "dense")

logger = logging.getLogger(__name__)


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


def _stack(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], coeffs: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """``(U0, V0^T)`` in float64 with ``U0 @ V0^T = sum_k c_k B_k A_k``.

    ``U0 = [sqrt|c_k| B_k ...]`` is ``d x R`` and ``V0^T = [sign(c_k) sqrt|c_k| A_k; ...]``
    is ``R x k``, ``R = sum_k r_k`` (splitting ``|c_k|`` evenly keeps both sides of the
    same scale).
    """
    c = np.asarray(coeffs, dtype=np.float64)
    root = np.sqrt(np.abs(c))
    total = sum(b.shape[1] for b in Bs)
    u0 = np.empty((Bs[0].shape[0], total))
    v0t = np.empty((total, As[0].shape[1]))
    start = 0
    for r, s, b, a in zip(root, np.sign(c), Bs, As, strict=True):
        cols = slice(start, start + b.shape[1])
        np.multiply(b, r, out=u0[:, cols])  # one pass: cast, scale and place
        np.multiply(a, s * r, out=v0t[cols])
        start = cols.stop
    return u0, v0t


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
    return _factored(*_stack(Bs, As, coeffs), rank)


def _factored(
    u0: np.ndarray, v0t: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`factored_svd` of stacked factors (see :func:`_stack`)."""
    qu, ru = np.linalg.qr(u0)
    qv, rv = np.linalg.qr(v0t.T)
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


# --- randomized block Krylov path -----------------------------------------------------

DEFAULT_TOL = 1e-8
DEFAULT_OVERSAMPLE = 16
# Krylov steps the cost model assumes. Measured at the default tol on 4096 x 4096, rank
# 64, Gaussian factors (flat spectra, the hard case; trained updates decay faster):
# 3 at R = 192 (10 clients), 8 at R = 764 (80 heavy-tail), 10-11 at R = 1106..2804
# (80 of random ranks); 19 at R = 5120 > d, where the path still wins by far.
EXPECTED_STEPS = 12
_EPS = float(np.finfo(np.float64).eps)
_NOISE = 64.0  # G's float64 rounding level, in units of eps * ||U0||_F ||V0||_F * S_1


class SvdNotCertifiedError(RuntimeError):
    """:func:`randomized_svd` did not reach its tolerance within its step budget."""


def randomized_svd(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], coeffs: Sequence[float], rank: int,
    *, tol: float = DEFAULT_TOL, oversample: int = DEFAULT_OVERSAMPLE, seed: int = 0,
    max_steps: int | None = None, fallback: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD of ``M = sum_k c_k B_k A_k`` by randomized block Krylov iteration.

    ``M = U0 V0^T`` (see :func:`factored_svd`) is used only through products with thin
    blocks, ``M X = U0 (V0^T X)`` and ``M^T Y = V0 (U0^T Y)``, in float64: no ``d x k``
    matrix and no ``R x R`` core. With block width ``l = rank + oversample`` and a
    Gaussian start ``Omega`` (``k x l``, from ``seed``), step ``i`` adds the block
    ``(M M^T)^i M Omega`` to an orthonormal basis ``Q`` of the left Krylov space
    (re-orthonormalised against all earlier blocks, with QR, twice), and the Ritz
    triplets are the top ``rank`` of the SVD of ``Q^T M`` (Rayleigh-Ritz). A block Krylov
    space converges much faster than plain subspace (power) iteration on the flat spectra
    that many clients of random ranks give (see BENCHMARKS.md); each step costs two
    products with ``l`` columns, ``4 (d + k) R l`` flops.

    Certified tolerance. After each step the Gram residual
    ``G = M M^T U_r - U_r S_r^2 = (I - Q Q^T) M M^T U_r`` is formed from products already
    computed (no extra pass over the factors), and the iteration stops only when
    ``||G||_F <= tol * S_1 * max(S_r, tol * S_1)``. Then every returned ``S_j`` is within
    ``tol * S_1`` of a distinct singular value of ``M`` (Kahan's residual bound for the
    Hermitian ``M M^T``) and ``S_j <= sigma_j`` (Cauchy interlacing). The returned
    ``U_r S_r Vt_r`` is exactly ``U_r U_r^T M``, so its squared error
    ``||M||_F^2 - sum_j S_j^2`` exceeds the optimum's by ``sum_j (sigma_j^2 - S_j^2)``,
    at most ``2 * rank * tol * S_1 * sigma_1``, unless the Krylov space missed a singular
    direction altogether (no residual can see that; a Gaussian start makes it vanishingly
    unlikely). Where ``M`` has a gap ``delta = sigma_r^2 - sigma_{r+1}^2`` at the cut, the
    subspace is within angle ``||G|| / delta`` of the optimal one (Davis-Kahan), so the
    rank-``r`` product is close to the dense one. The bound is relaxed to float64
    rounding, ``||G||_F <= 64 eps ||U0||_F ||V0||_F S_1``, where that is larger (cancelling
    clients, exactly rank-deficient ``M``): the accuracy the factored and dense paths have
    there too. In practice the singular values come out far more accurate than ``tol``
    (see BENCHMARKS.md).

    Falls back to the cheaper exact path (:func:`factored_svd` or :func:`dense_svd`, by
    :func:`svd_costs`) when the tolerance is not certified within ``max_steps`` (logged
    as a warning), and delegates to :func:`factored_svd` when ``l`` reaches
    ``min(d, k, R)``, where a sketch has nothing to save.

    Args:
        Bs: ``B_k``, each ``d x r_k``.
        As: ``A_k``, each ``r_k x k``.
        coeffs: ``c_k``, any sign.
        rank: the number of triplets to return, ``>= 1``.
        tol: the certified tolerance, relative to the largest singular value, ``> 0``.
        oversample: extra columns of the block beyond ``rank``, ``>= 0``.
        seed: seed of the Gaussian start block (the result is deterministic).
        max_steps: Krylov steps before giving up; default: ``EXPECTED_STEPS``, more
            while that still costs less than the cheaper exact path, and no more than
            the dimensions allow (``(rank + oversample) * max_steps <= d``).
        fallback: on failure, use an exact path (``True``) or raise.

    Returns:
        ``(U, S, Vt)`` as :func:`factored_svd` returns them (float64, orthonormal ``U``
        columns and ``Vt`` rows, non-increasing ``S``).

    Raises:
        ValueError: bad inputs (as :func:`factored_svd`), ``tol <= 0`` or
            ``oversample < 0``.
        SvdNotCertifiedError: not certified within ``max_steps`` and ``fallback=False``.

    """
    _check_factors(Bs, As, coeffs, rank)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if oversample < 0:
        raise ValueError(f"oversample must be at least 0, got {oversample}")
    u0, v0t = _stack(Bs, As, coeffs)
    (d, total), k = u0.shape, v0t.shape[1]
    block = rank + oversample
    if block >= min(d, k, total):
        return _factored(u0, v0t, rank)
    steps = _step_budget(d, k, total, rank, block) if max_steps is None else max_steps
    steps = max(1, min(steps, d // block))
    result = _block_krylov(u0, v0t, rank, block, tol=tol, seed=seed, max_steps=steps)
    if result is not None:
        return result
    message = (f"randomized SVD ({d} x {k}, R = {total}, rank {rank}) did not certify "
               f"tol {tol:g} in {steps} Krylov steps")
    if not fallback:
        raise SvdNotCertifiedError(message + "; use method='factored' or raise max_steps")
    costs = svd_costs(d, k, total, rank)
    if costs["dense"] < costs["factored"]:
        logger.warning("%s; using the dense SVD", message)
        return dense_svd(Bs, As, coeffs, rank)
    logger.warning("%s; using the factored SVD", message)
    return _factored(u0, v0t, rank)


def _orthonormal_block(
    q: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """An orthonormal basis of (the part orthogonal to ``q``'s columns of) ``y``'s columns.

    Each round projects out ``q`` and orthonormalises with QR; a second round runs
    whenever the first removed more than half of a column (twice is enough). A column
    that lies in ``span(q)`` (the Krylov space has become invariant) is replaced by a
    random direction, so the result always has ``y.shape[1]`` orthonormal columns
    orthogonal to ``q``.
    """
    norms = np.linalg.norm(y, axis=0)
    basis = y / np.where(norms > 0, norms, 1.0)
    for _ in range(4):
        basis -= q @ (q.T @ basis)
        kept = np.linalg.norm(basis, axis=0)
        lost = kept <= 1e-10
        if lost.any():  # projected in the next round
            basis[:, lost] = rng.standard_normal((basis.shape[0], int(lost.sum())))
        basis, _ = np.linalg.qr(basis)
        if kept.min() > 0.5:
            break
    return basis


def _block_krylov(
    u0: np.ndarray, v0t: np.ndarray, rank: int, block: int, *, tol: float, seed: int,
    max_steps: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The iteration of :func:`randomized_svd`; ``None`` if not certified in time."""
    (d, _), k = u0.shape, v0t.shape[1]
    rng = np.random.default_rng(seed)
    noise = _NOISE * _EPS * float(np.linalg.norm(u0) * np.linalg.norm(v0t))
    size = block * max_steps
    q = np.empty((d, size))  # orthonormal basis of the left Krylov space
    mtq = np.empty((k, size))  # M^T Q
    mmtq = np.empty((d, size))  # M M^T Q
    gram = np.empty((size, size))  # (M^T Q)^T (M^T Q) = Q^T M M^T Q
    q[:, :block], _ = np.linalg.qr(u0 @ (v0t @ rng.standard_normal((k, block))))
    width = 0
    for _ in range(max_steps):
        new = slice(width, width + block)
        width += block
        mtq[:, new] = v0t.T @ (u0.T @ q[:, new])
        gram[:width, new] = mtq[:, :width].T @ mtq[:, new]
        gram[new, :width] = gram[:width, new].T
        z, rz = np.linalg.qr(mtq[:, new])
        y = u0 @ (v0t @ z)  # the next Krylov block; M M^T Q_i = y rz
        mmtq[:, new] = y @ rz
        ritz = np.linalg.eigh(gram[:width, :width])[1][:, :-rank - 1:-1]  # top rank, desc.
        v, s, xt = np.linalg.svd(mtq[:, :width] @ ritz, full_matrices=False)
        residual = mmtq[:, :width] @ ritz
        residual -= q[:, :width] @ (q[:, :width].T @ residual)
        bound = max(tol * s[0] * max(s[-1], tol * s[0]), noise * (s[0] + noise))
        if np.linalg.norm(residual) <= bound:
            return q[:, :width] @ (ritz @ xt.T), s, v.T
        if width + block > size:
            return None
        q[:, width:width + block] = _orthonormal_block(q[:, :width], y, rng)
    return None


# --- cost model and path choice ---------------------------------------------------------

# Speed of the LAPACK kernels against a matrix product (gemm), measured with one OpenBLAS
# thread (numpy 2.4) on the project's machine: (seconds x gemm flop rate) / nominal flops.
_QR_WEIGHT = 1.6  # np.linalg.qr (geqrf + orgqr), per 4 a b^2 - 4 b^3 / 3 flops, + 400 / b
_SVD_WEIGHT = 20.0  # np.linalg.svd (gesdd with vectors), per b^3, + 8 (a - b) b^2
_EIGH_WEIGHT = 10.0  # np.linalg.eigh (syevd), per n^3
_CALL = 2e6  # the fixed cost of one numpy call (tens of microseconds), in gemm flops


def _qr_cost(m: int, n: int) -> float:
    a, b = max(m, n), min(m, n)
    return (_QR_WEIGHT + 400 / b) * (4 * a * b * b - 4 * b ** 3 / 3) + _CALL


def _svd_cost(m: int, n: int) -> float:
    a, b = max(m, n), min(m, n)
    return (1 + 100 / b) * (_SVD_WEIGHT * b ** 3 + 8 * (a - b) * b * b) + _CALL


def _factored_cost(d: int, k: int, total: int, rank: int) -> float:
    a, b = min(d, total), min(k, total)
    return (_qr_cost(d, total) + _qr_cost(k, total) + 2 * a * b * total + _svd_cost(a, b)
            + 2 * (d * a + k * b) * min(rank, a, b))


def _dense_cost(d: int, k: int, total: int) -> float:
    return 2 * d * k * total + _svd_cost(d, k)


def _krylov_cost(d: int, k: int, total: int, rank: int, block: int, steps: int) -> float:
    apply = 2 * (d + k) * total * block + 2 * _CALL
    cost = apply + _qr_cost(d, block)
    for i in range(1, steps + 1):
        width = i * block
        cost += (2 * apply + 2 * k * width * block + _qr_cost(k, block) + 2 * d * block ** 2
                 + _EIGH_WEIGHT * width ** 3 + 2 * k * width * rank + _svd_cost(k, rank)
                 + 6 * d * width * rank + 10 * _CALL)
        if i < steps:
            cost += 2 * (4 * d * width * block + _qr_cost(d, block))
    return cost + 2 * d * (steps * block) * rank


def _step_budget(d: int, k: int, total: int, rank: int, block: int) -> int:
    """Default ``max_steps`` of :func:`randomized_svd`.

    At least the expected steps, more while the iteration would still cost less than the
    cheaper exact path (so a failed run wastes at most about that much before the
    fallback), and no more than the dimensions allow: ``block * steps <= d``, and a
    Krylov space of dimension ``R`` already holds ``range(M)``.
    """
    cap = max(1, min(d // block, math.ceil(total / block) + 1))
    steps = min(EXPECTED_STEPS, cap)
    exact = min(_factored_cost(d, k, total, rank), _dense_cost(d, k, total))
    limit = max(exact, _krylov_cost(d, k, total, rank, block, steps))
    while steps < cap and _krylov_cost(d, k, total, rank, block, steps + 1) <= limit:
        steps += 1
    return steps


def svd_costs(
    d: int, k: int, total_rank: int, rank: int, *, oversample: int = DEFAULT_OVERSAMPLE
) -> dict[str, float]:
    """Estimated cost of each SVD path, in flops of a matrix product taking as long.

    Nominal LAPACK flop counts weighted by each kernel's speed against a matrix product
    (measured with one BLAS thread); the randomized path is costed at
    ``EXPECTED_STEPS`` Krylov steps (where it delegates to the factored path, so is its
    cost). The dense path forms ``M`` in ``2 d k R`` flops and takes a full SVD.

    Args:
        d: rows of the update.
        k: columns of the update.
        total_rank: ``R = sum_k r_k``.
        rank: the number of triplets wanted.
        oversample: as :func:`randomized_svd`.

    Returns:
        ``{"factored": ..., "randomized": ..., "dense": ...}``.

    """
    factored = _factored_cost(d, k, total_rank, rank)
    block = rank + oversample
    if block >= min(d, k, total_rank):
        randomized = factored
    else:
        steps = max(1, min(EXPECTED_STEPS, d // block, math.ceil(total_rank / block) + 1))
        randomized = _krylov_cost(d, k, total_rank, rank, block, steps)
    return {"factored": factored, "randomized": randomized,
            "dense": _dense_cost(d, k, total_rank)}


def choose_svd_method(d: int, k: int, total_rank: int, rank: int) -> str:
    """The path of least estimated cost (:func:`svd_costs`); exact paths win ties."""
    costs = svd_costs(d, k, total_rank, rank)
    return min(("factored", "dense", "randomized"), key=lambda m: costs[m])


def flexlora_svd(
    Bs: Sequence[np.ndarray], As: Sequence[np.ndarray], coeffs: Sequence[float], rank: int,
    *, method: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD of ``sum_k c_k B_k A_k`` by the cheapest path, or the one named.

    Args:
        Bs: ``B_k``, each ``d x r_k``.
        As: ``A_k``, each ``r_k x k``.
        coeffs: ``c_k``, any sign.
        rank: the number of triplets to return, ``>= 1``.
        method: ``"auto"`` (:func:`choose_svd_method`), ``"factored"``,
            ``"randomized"`` or ``"dense"``.

    Returns:
        ``(U, S, Vt)`` as :func:`factored_svd` returns them.

    Raises:
        ValueError: unknown ``method``, or bad inputs (as :func:`factored_svd`).

    """
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; expected one of {list(SVD_METHODS)}")
    d, k = _check_factors(Bs, As, coeffs, rank)
    if method == "auto":
        method = choose_svd_method(d, k, sum(b.shape[1] for b in Bs), rank)
    return {"factored": factored_svd, "randomized": randomized_svd, "dense": dense_svd}[
        method](Bs, As, coeffs, rank)


# --- splitting into LoRA factors --------------------------------------------------------


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
