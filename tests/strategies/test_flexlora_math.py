from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.adapter import LoraFactors
from strategies.flexlora import flexlora_aggregate
from strategies.flexlora_math import (
    SvdNotCertifiedError,
    _orthonormal_block,
    choose_svd_method,
    dense_svd,
    factored_svd,
    flexlora_module_update,
    flexlora_svd,
    randomized_svd,
    split_singular_values,
    svd_costs,
)
from tests.conftest import random_adapter


def _factors(rng, d, k, ranks, dtype=np.float64):
    bs = [rng.standard_normal((d, r)).astype(dtype) for r in ranks]
    as_ = [rng.standard_normal((r, k)).astype(dtype) for r in ranks]
    return bs, as_


def _dense(bs, as_, coeffs):
    return sum(c * (b.astype(np.float64) @ a.astype(np.float64))
               for c, b, a in zip(coeffs, bs, as_, strict=True))


def _product(u, s, vt):
    return (u * s) @ vt


def _rel(x, y):
    return np.linalg.norm(x - y) / np.linalg.norm(y)


def _assert_paths_agree(bs, as_, coeffs, rank, tol):
    fu, fs, fvt = factored_svd(bs, as_, coeffs, rank)
    du, ds, dvt = dense_svd(bs, as_, coeffs, rank)
    assert fu.shape == du.shape and fs.shape == (rank,) and fvt.shape == dvt.shape
    assert fu.dtype == fs.dtype == fvt.dtype == np.float64
    assert np.abs(fs - ds).max() / ds.max() < tol
    assert _rel(_product(fu, fs, fvt), _product(du, ds, dvt)) < tol
    return fu, fs, fvt


# --- factored vs dense -----------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-5), (np.float32, 1e-4)])
@pytest.mark.parametrize("rank", [1, 8, 30])
def test_factored_equals_dense_mixed_ranks(dtype, tol, rank):
    rng = np.random.default_rng(0)
    bs, as_ = _factors(rng, 64, 48, [2, 4, 8, 16], dtype)
    coeffs = [0.1 * 16 / 2, 0.2 * 16 / 4, 0.3 * 16 / 8, 0.4 * 16 / 16]
    _assert_paths_agree(bs, as_, coeffs, rank, tol)


def test_full_rank_reconstructs_the_sum_of_products():
    rng = np.random.default_rng(1)
    bs, as_ = _factors(rng, 64, 48, [2, 4, 8, 16])
    coeffs = [0.5, -1.25, 2.0, 0.75]  # a negative coefficient too
    u, s, vt = factored_svd(bs, as_, coeffs, 30)
    assert _rel(_product(u, s, vt), _dense(bs, as_, coeffs)) < 1e-12
    assert np.all(np.diff(s) <= 0) and np.all(s >= 0)
    np.testing.assert_allclose(u.T @ u, np.eye(30), atol=1e-10)
    np.testing.assert_allclose(vt @ vt.T, np.eye(30), atol=1e-10)


def test_identical_clients_are_rank_deficient():
    rng = np.random.default_rng(2)
    b, a = _factors(rng, 40, 30, [6])
    bs, as_ = [b[0], b[0].copy()], [a[0], a[0].copy()]
    u, s, vt = _assert_paths_agree(bs, as_, [0.25, 0.75], 12, 1e-5)
    assert s[6:].max() < 1e-12 * s[0]  # true rank 6 of R = 12
    assert _rel(_product(u, s, vt), b[0] @ a[0]) < 1e-12
    _assert_paths_agree(bs, as_, [0.25, 0.75], 3, 1e-5)


def test_duplicated_columns_of_b():
    rng = np.random.default_rng(3)
    bs, as_ = _factors(rng, 40, 30, [4, 5])
    bs[0][:, 1] = bs[0][:, 0]
    bs[0][:, 3] = bs[0][:, 2]
    u, s, vt = _assert_paths_agree(bs, as_, [1.0, 0.5], 9, 1e-5)
    assert s[7:].max() < 1e-12 * s[0]  # rank 9 - 2
    _assert_paths_agree(bs, as_, [1.0, 0.5], 4, 1e-5)


@pytest.mark.parametrize("how", ["zero factors", "zero coefficients", "zero B only"])
def test_all_zero_update_gives_zero_singular_values_and_no_nan(how):
    rng = np.random.default_rng(4)
    bs, as_ = _factors(rng, 16, 12, [2, 3])
    coeffs = [1.0, 2.0]
    if how == "zero factors":
        bs, as_ = [np.zeros_like(b) for b in bs], [np.zeros_like(a) for a in as_]
    elif how == "zero coefficients":
        coeffs = [0.0, 0.0]
    else:
        bs = [np.zeros_like(b) for b in bs]
    for fn in (factored_svd, dense_svd):
        u, s, vt = fn(bs, as_, coeffs, 4)
        assert np.isfinite(u).all() and np.isfinite(vt).all()
        np.testing.assert_array_equal(s, np.zeros(4))
        assert not _product(u, s, vt).any()


def test_rank_above_total_rank_pads_with_zero_singular_values_orthonormally():
    rng = np.random.default_rng(5)
    bs, as_ = _factors(rng, 10, 8, [1, 1])
    u, s, vt = _assert_paths_agree(bs, as_, [1.0, 1.0], 5, 1e-5)
    assert u.shape == (10, 5) and vt.shape == (5, 8)
    assert not s[2:].any()
    # the padded singular vectors complete U and Vt orthonormally
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(vt @ vt.T, np.eye(5), atol=1e-12)


def test_total_rank_above_min_dimension():
    # R = 11 > min(d, k) = 6: the core is 8 x 6 and M has only 6 triplets.
    rng = np.random.default_rng(6)
    bs, as_ = _factors(rng, 8, 6, [4, 4, 3])
    coeffs = [0.3, -0.2, 0.5]
    _assert_paths_agree(bs, as_, coeffs, 3, 1e-5)
    u, s, vt = _assert_paths_agree(bs, as_, coeffs, 6, 1e-5)
    assert _rel(_product(u, s, vt), _dense(bs, as_, coeffs)) < 1e-12
    u, s, vt = factored_svd(bs, as_, coeffs, 9)  # beyond min(d, k): zero vectors
    assert u.shape == (8, 9) and vt.shape == (9, 6)
    assert not s[6:].any() and not u[:, 6:].any() and not vt[6:].any()
    np.testing.assert_allclose(u[:, :6].T @ u[:, :6], np.eye(6), atol=1e-12)


def test_svd_input_errors():
    rng = np.random.default_rng(7)
    bs, as_ = _factors(rng, 6, 5, [2, 3])
    with pytest.raises(ValueError, match="as many"):
        factored_svd(bs, as_, [1.0], 2)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        factored_svd(bs, as_, [1.0, 1.0], 0)
    with pytest.raises(ValueError, match="client 1"):
        factored_svd(bs, [as_[0], as_[1][:, :4]], [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="different ranks"):
        dense_svd([bs[0]], [as_[1]], [1.0], 2)
    with pytest.raises(ValueError, match="finite"):
        factored_svd(bs, as_, [1.0, np.inf], 2)


@st.composite
def _svd_problem(draw):
    d = draw(st.integers(1, 10))
    k = draw(st.integers(1, 10))
    ranks = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    magnitude = st.floats(1e-3, 3.0, allow_nan=False, allow_infinity=False)
    coeff = st.one_of(st.just(0.0), magnitude, magnitude.map(lambda c: -c))
    coeffs = draw(st.lists(coeff, min_size=len(ranks), max_size=len(ranks)))
    rank = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return d, k, ranks, coeffs, rank, seed, dtype


@settings(max_examples=25, deadline=None)
@given(_svd_problem())
def test_factored_equals_dense_property(problem):
    d, k, ranks, coeffs, rank, seed, dtype = problem
    bs, as_ = _factors(np.random.default_rng(seed), d, k, ranks, dtype)
    fu, fs, fvt = factored_svd(bs, as_, coeffs, rank)
    du, ds, dvt = dense_svd(bs, as_, coeffs, rank)
    assert fu.shape == (d, rank) and fs.shape == (rank,) and fvt.shape == (rank, k)
    assert np.isfinite(fu).all() and np.isfinite(fs).all() and np.isfinite(fvt).all()
    m = _dense(bs, as_, coeffs)
    scale = max(np.linalg.norm(m), 1e-300)
    np.testing.assert_allclose(fs, ds, rtol=0, atol=1e-9 * scale)
    # the rank-r product is unique unless singular values tie at the cut
    full = np.linalg.svd(m, compute_uv=False)
    tie = (rank < len(full) and full[rank] > 1e-9 * scale
           and full[rank - 1] - full[rank] < 1e-6 * scale)
    if not tie:
        diff = np.linalg.norm(_product(fu, fs, fvt) - _product(du, ds, dvt))
        assert diff <= 1e-8 * scale
    if rank >= min(d, k, sum(ranks)):
        assert np.linalg.norm(_product(fu, fs, fvt) - m) <= 1e-9 * scale


# --- randomized block Krylov vs dense --------------------------------------------------
#
# These problems keep the block (rank + oversample) below min(d, k, R), so the Krylov
# iteration really runs (it delegates to the factored path otherwise), and use
# fallback=False, so a result that was not certified raises instead of silently coming
# from the factored path.


def _prescribed_spectrum(rng, d, k, sigmas, client_ranks, dtype=np.float64):
    """Clients whose weighted sum is U diag(sigmas) V^T with random orthonormal U, V."""
    total = len(sigmas)
    assert sum(client_ranks) == total
    u = np.linalg.qr(rng.standard_normal((d, total)))[0]
    v = np.linalg.qr(rng.standard_normal((k, total)))[0]
    perm = rng.permutation(total)  # each client gets singular values from all over
    bs, as_, coeffs, start = [], [], [], 0
    for r in client_ranks:
        cols = perm[start:start + r]
        start += r
        c = float(rng.uniform(0.5, 2.0)) * (-1) ** len(coeffs)
        bs.append((u[:, cols] * sigmas[cols] / c).astype(dtype))
        as_.append(v[:, cols].T.astype(dtype))
        coeffs.append(c)
    return bs, as_, coeffs


def _check_triplets(u, s, vt, rank, d, k):
    assert u.shape == (d, rank) and s.shape == (rank,) and vt.shape == (rank, k)
    assert u.dtype == s.dtype == vt.dtype == np.float64
    assert np.isfinite(u).all() and np.isfinite(s).all() and np.isfinite(vt).all()
    assert np.all(np.diff(s) <= 0) and np.all(s >= 0)
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-12)
    np.testing.assert_allclose(vt @ vt.T, np.eye(rank), atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_randomized_equals_dense_on_a_decaying_spectrum(dtype):
    rng = np.random.default_rng(20)
    sigmas = 0.8 ** np.arange(120)
    bs, as_, coeffs = _prescribed_spectrum(rng, 300, 200, sigmas, [10] * 12, dtype)
    u, s, vt = randomized_svd(bs, as_, coeffs, 10, oversample=6, fallback=False)
    _check_triplets(u, s, vt, 10, 300, 200)
    du, ds, dvt = dense_svd(bs, as_, coeffs, 10)
    assert np.abs(s - ds).max() < 1e-12 * ds[0]
    assert _rel(_product(u, s, vt), _product(du, ds, dvt)) < 1e-10
    if dtype == np.float64:  # the spectrum was built exactly
        np.testing.assert_allclose(s, sigmas[:10], rtol=0, atol=1e-12)


def test_randomized_on_a_flat_spectrum_is_as_good_as_the_optimum():
    # Gaussian factors of random (mixed) ranks and mixed-sign coefficients: no gap to
    # speak of, so the top-r subspace is barely determined; compare singular values and
    # the rank-r approximation error against the optimal (dense) one.
    rng = np.random.default_rng(21)
    ranks = rng.integers(2, 11, size=30).tolist()
    bs, as_ = _factors(rng, 400, 300, ranks)
    coeffs = (rng.uniform(0.2, 1.0, size=30) * rng.choice([-1, 1], size=30)).tolist()
    m = _dense(bs, as_, coeffs)
    sigma = np.linalg.svd(m, compute_uv=False)
    assert (sigma[15] - sigma[16]) / sigma[0] < 0.05  # flat indeed
    u, s, vt = randomized_svd(bs, as_, coeffs, 16, oversample=8, fallback=False)
    _check_triplets(u, s, vt, 16, 400, 300)
    assert np.abs(s - sigma[:16]).max() < 1e-10 * sigma[0]
    optimal = np.sqrt(np.sum(sigma[16:] ** 2))
    assert np.linalg.norm(m - _product(u, s, vt)) / optimal - 1 < 1e-10


def test_randomized_certified_tolerance_holds_when_loose():
    # With a loose tol the iteration stops early; the documented bounds must still hold:
    # each S_j within tol * S_1 of sigma_j, S_j <= sigma_j, and an approximation error
    # above the optimum by at most 2 * rank * tol * S_1 * sigma_1 (in squared norm).
    rng = np.random.default_rng(22)
    bs, as_ = _factors(rng, 400, 300, [6] * 30)
    coeffs = rng.uniform(0.2, 1.0, size=30).tolist()
    m = _dense(bs, as_, coeffs)
    sigma = np.linalg.svd(m, compute_uv=False)
    tol, rank = 1e-3, 12
    u, s, vt = randomized_svd(bs, as_, coeffs, rank, tol=tol, oversample=4, fallback=False)
    tight = randomized_svd(bs, as_, coeffs, rank, oversample=4, fallback=False)[1]
    assert np.abs(s - tight).max() > 1e-12 * sigma[0]  # it did stop early
    assert np.abs(s - sigma[:rank]).max() <= tol * s[0]
    assert np.all(s <= sigma[:rank] * (1 + 1e-12))
    excess = np.linalg.norm(m - _product(u, s, vt)) ** 2 - np.sum(sigma[rank:] ** 2)
    assert -1e-9 * sigma[0] ** 2 <= excess <= 2 * rank * tol * s[0] * sigma[0]


def test_randomized_rank_deficient_and_rank_above_the_true_rank():
    # 20 clients that are 4 distinct ones repeated: R = 100, true rank 20; ask for 24.
    rng = np.random.default_rng(23)
    base_b, base_a = _factors(rng, 200, 150, [5, 5, 5, 5])
    bs = [base_b[i % 4].copy() for i in range(20)]
    as_ = [base_a[i % 4].copy() for i in range(20)]
    coeffs = rng.uniform(0.1, 1.0, size=20).tolist()
    u, s, vt = randomized_svd(bs, as_, coeffs, 24, oversample=8, fallback=False)
    _check_triplets(u, s, vt, 24, 200, 150)
    ds = dense_svd(bs, as_, coeffs, 24)[1]
    assert np.abs(s - ds).max() < 1e-10 * ds[0]
    assert s[20:].max() < 1e-10 * s[0]
    assert _rel(_product(u, s, vt), _dense(bs, as_, coeffs)) < 1e-10


@pytest.mark.parametrize("how", ["zero factors", "zero coefficients", "cancelling clients"])
def test_randomized_zero_update(how):
    rng = np.random.default_rng(24)
    bs, as_ = _factors(rng, 120, 90, [6] * 10)
    coeffs = [1.0] * 10
    if how == "zero factors":
        bs = [np.zeros_like(b) for b in bs]
    elif how == "zero coefficients":
        coeffs = [0.0] * 10
    else:  # clients 5..9 undo clients 0..4: M = 0 up to rounding
        bs, as_ = bs[:5] * 2, as_[:5] * 2
        coeffs = [1.0] * 5 + [-1.0] * 5
    u, s, vt = randomized_svd(bs, as_, coeffs, 8, oversample=4, fallback=False)
    _check_triplets(u, s, vt, 8, 120, 90)
    if how == "cancelling clients":
        assert s.max() < 1e-12 * sum(np.linalg.norm(b) * np.linalg.norm(a)
                                     for b, a in zip(bs, as_, strict=True))
    else:
        np.testing.assert_array_equal(s, np.zeros(8))
        assert not _product(u, s, vt).any()


def test_randomized_delegates_to_factored_when_the_block_covers_r():
    # rank + oversample >= R (here rank > R): nothing to sketch; exactly the factored SVD,
    # zero-padded singular values included.
    rng = np.random.default_rng(25)
    bs, as_ = _factors(rng, 50, 40, [2, 3])
    coeffs = [0.7, -1.1]
    got = randomized_svd(bs, as_, coeffs, 8, fallback=False)
    want = factored_svd(bs, as_, coeffs, 8)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert not got[1][5:].any()


@pytest.mark.parametrize(("d", "k", "exact"), [(800, 600, "factored"), (300, 200, "dense")])
def test_randomized_not_certified_raises_or_falls_back(caplog, d, k, exact):
    # the fallback is the cheaper exact path by the cost model
    assert min(("factored", "dense"), key=svd_costs(d, k, 160, 10).get) == exact
    rng = np.random.default_rng(26)
    bs, as_ = _factors(rng, d, k, [8] * 20)
    coeffs = rng.uniform(0.2, 1.0, size=20).tolist()
    with pytest.raises(SvdNotCertifiedError, match="did not certify tol 1e-08 in 1"):
        randomized_svd(bs, as_, coeffs, 10, oversample=6, max_steps=1, fallback=False)
    with caplog.at_level(logging.WARNING, logger="strategies.flexlora_math"):
        got = randomized_svd(bs, as_, coeffs, 10, oversample=6, max_steps=1)
    assert f"using the {exact} SVD" in caplog.text
    want = (factored_svd if exact == "factored" else dense_svd)(bs, as_, coeffs, 10)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_randomized_input_errors():
    rng = np.random.default_rng(27)
    bs, as_ = _factors(rng, 30, 20, [4, 4])
    with pytest.raises(ValueError, match="tol must be positive"):
        randomized_svd(bs, as_, [1.0, 1.0], 2, tol=0.0)
    with pytest.raises(ValueError, match="oversample must be at least 0"):
        randomized_svd(bs, as_, [1.0, 1.0], 2, oversample=-1)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        randomized_svd(bs, as_, [1.0, 1.0], 0)


def test_orthonormal_block_replaces_columns_inside_the_basis():
    # y's columns: one inside span(q) exactly, one zero, one generic. The result must be
    # orthonormal and orthogonal to q (a plain QR would return e_1 or e_2 again).
    q = np.eye(6)[:, :2]
    y = np.zeros((6, 3))
    y[:, 0] = [1.0, 2.0, 0, 0, 0, 0]
    y[:, 2] = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    basis = _orthonormal_block(q, y, np.random.default_rng(0))
    assert basis.shape == (6, 3)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-14)
    np.testing.assert_allclose(q.T @ basis, 0.0, atol=1e-14)


@st.composite
def _krylov_problem(draw):
    d = draw(st.integers(30, 60))
    k = draw(st.integers(30, 60))
    ranks = draw(st.lists(st.integers(1, 6), min_size=6, max_size=14))
    coeffs = draw(st.lists(st.floats(-3.0, 3.0, allow_nan=False), min_size=len(ranks),
                           max_size=len(ranks)))
    rank = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return d, k, ranks, coeffs, rank, seed, dtype


@settings(max_examples=25, deadline=None)
@given(_krylov_problem())
def test_randomized_matches_dense_property(problem):
    d, k, ranks, coeffs, rank, seed, dtype = problem
    bs, as_ = _factors(np.random.default_rng(seed), d, k, ranks, dtype)
    # with the fallback: small problems can run out of room (block * steps <= d) before
    # certifying, and then get the factored result; either way the tolerance holds
    u, s, vt = randomized_svd(bs, as_, coeffs, rank, oversample=2)
    _check_triplets(u, s, vt, rank, d, k)
    m = _dense(bs, as_, coeffs)
    sigma = np.linalg.svd(m, compute_uv=False)
    scale = max(sigma[0], 1e-300)
    # within tol * S_1 (1e-8) of the true values, or the float64 rounding floor
    np.testing.assert_allclose(s, np.pad(sigma, (0, rank))[:rank], rtol=0, atol=1e-7 * scale)
    optimal2 = np.sum(sigma[rank:] ** 2)
    assert np.linalg.norm(m - _product(u, s, vt)) ** 2 - optimal2 <= 1e-7 * scale ** 2


# --- automatic path choice -------------------------------------------------------------


@pytest.mark.parametrize(("shape", "expected"), [
    ((4096, 4096, 192, 64), "factored"),  # 10 clients: R small against the layer
    ((4096, 4096, 764, 64), "factored"),  # 80 heavy-tail clients
    ((4096, 4096, 2804, 64), "randomized"),  # 80 clients of random ranks 4..64
    ((4096, 4096, 5120, 64), "randomized"),  # 80 clients of rank 64: R > d
    ((4096, 11008, 2804, 64), "randomized"),  # an MLP projection
    ((512, 512, 4000, 400), "dense"),  # R >> d and a rank near d: nothing to save
])
def test_auto_picks_the_expected_path(shape, expected):
    assert choose_svd_method(*shape) == expected


def test_cost_model_orders_paths_as_measured():
    # CPU times measured with one BLAS thread at 4096 x 4096, rank 64 (BENCHMARKS.md): at
    # R = 764 factored 0.96 s < randomized 1.5 s < dense 36 s; at R = 2804 randomized
    # 3.4 s < factored 17 s < dense 35 s; at R = 5120 randomized 13 s < dense 38 s <
    # factored 53 s
    cheap = svd_costs(4096, 4096, 764, 64)
    flat = svd_costs(4096, 4096, 2804, 64)
    full = svd_costs(4096, 4096, 5120, 64)
    assert cheap["factored"] < cheap["randomized"] < cheap["dense"] / 10
    assert flat["randomized"] < flat["factored"] < flat["dense"]
    assert full["randomized"] < full["dense"] < full["factored"]
    # delegation: a block that covers R costs what the factored path costs
    small = svd_costs(300, 200, 60, 50)
    assert small["randomized"] == small["factored"]


def test_flexlora_svd_dispatches_and_validates():
    rng = np.random.default_rng(28)
    bs, as_ = _factors(rng, 300, 200, [8] * 20)
    coeffs = rng.uniform(0.2, 1.0, size=20).tolist()
    auto = flexlora_svd(bs, as_, coeffs, 10)
    chosen = choose_svd_method(300, 200, 160, 10)
    named = flexlora_svd(bs, as_, coeffs, 10, method=chosen)
    for a, b in zip(auto, named, strict=True):
        np.testing.assert_array_equal(a, b)
    ds = dense_svd(bs, as_, coeffs, 10)[1]
    for method in ("factored", "randomized", "dense"):
        s = flexlora_svd(bs, as_, coeffs, 10, method=method)[1]
        assert np.abs(s - ds).max() < 1e-10 * ds[0]
    with pytest.raises(ValueError, match=r"unknown SVD method 'qr'.*'auto', 'factored'"):
        flexlora_svd(bs, as_, coeffs, 10, method="qr")
    with pytest.raises(ValueError, match="as many"):
        flexlora_svd(bs, as_[:3], coeffs, 10)


def test_flexlora_aggregate_passes_the_svd_method_through():
    rng = np.random.default_rng(29)
    adapters = [random_adapter(rng, {"q": 4}, in_f=120, out_f=100) for _ in range(20)]
    counts = rng.integers(10, 100, size=20).tolist()
    ref = flexlora_aggregate(adapters, counts, rank=8, alpha=16.0, svd_method="dense")
    got = flexlora_aggregate(adapters, counts, rank=8, alpha=16.0, svd_method="randomized")
    a, b = got.modules["q"], ref.modules["q"]
    assert a.A.dtype == np.float32 and a.A.shape == (8, 120) and a.B.shape == (100, 8)
    np.testing.assert_allclose(np.linalg.svd(a.B @ a.A, compute_uv=False),
                               np.linalg.svd(b.B @ b.A, compute_uv=False), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown SVD method 'qr'"):
        flexlora_aggregate(adapters, counts, rank=8, alpha=16.0, svd_method="qr")


# --- splitting into LoRA factors -------------------------------------------------------


@pytest.mark.parametrize("mode", ["B", "sqrt"])
def test_split_reproduces_truncated_product(mode):
    rng = np.random.default_rng(8)
    bs, as_ = _factors(rng, 20, 16, [3, 5])
    u, s, vt = factored_svd(bs, as_, [0.4, 0.6], 8)
    for r in (1, 4, 8):
        f = split_singular_values(u, s, vt, r, mode)
        assert isinstance(f, LoraFactors) and f.rank == r
        assert f.B.shape == (20, r) and f.A.shape == (r, 16)
        target = _product(u[:, :r], s[:r], vt[:r])
        np.testing.assert_allclose(f.B @ f.A, target, atol=1e-12 * np.abs(target).max())


def test_split_modes_put_singular_values_where_documented():
    u = np.eye(3)[:, :2]
    s = np.array([4.0, 1.0])
    vt = np.eye(3)[:2]
    f = split_singular_values(u, s, vt, 2, "B")
    np.testing.assert_array_equal(f.B, [[4, 0], [0, 1], [0, 0]])
    np.testing.assert_array_equal(f.A, vt)
    g = split_singular_values(u, s, vt, 2, "sqrt")
    np.testing.assert_array_equal(g.B, [[2, 0], [0, 1], [0, 0]])
    np.testing.assert_array_equal(g.A, [[2, 0, 0], [0, 1, 0]])


def test_split_errors():
    u, s, vt = np.eye(3)[:, :2], np.array([2.0, 1.0]), np.eye(3)[:2]
    with pytest.raises(ValueError, match=r"unknown split mode 'C'.*\['B', 'sqrt'\]"):
        split_singular_values(u, s, vt, 1, "C")
    with pytest.raises(ValueError, match="between 1 and 2"):
        split_singular_values(u, s, vt, 3, "B")


# --- module update from adapters -------------------------------------------------------


def test_module_update_coefficients_hand_computed():
    rng = np.random.default_rng(9)
    c1 = random_adapter(rng, {"q": 2, "v": 2}, alpha=8.0)
    c2 = random_adapter(rng, {"q": 4, "v": 4}, alpha=8.0)
    bs, as_, coeffs = flexlora_module_update([c1, c2], np.array([0.25, 0.75]), "q")
    # 0.25 * 8/2 = 1.0 and 0.75 * 8/4 = 1.5
    assert coeffs == pytest.approx([1.0, 1.5])
    assert bs[0] is c1.modules["q"].B and as_[1] is c2.modules["q"].A


def test_module_update_svd_is_the_weighted_sum_of_scaled_updates():
    rng = np.random.default_rng(10)
    adapters = [random_adapter(rng, {"q": r}, in_f=12, out_f=10) for r in (1, 2, 4)]
    w = np.array([0.2, 0.3, 0.5])
    u, s, vt = factored_svd(*flexlora_module_update(adapters, w, "q"), rank=7)
    expected = sum(p * a.modules["q"].delta(a.alpha).astype(np.float64)
                   for p, a in zip(w, adapters, strict=True))
    assert _rel(_product(u, s, vt), expected) < 1e-6


def test_module_update_errors():
    rng = np.random.default_rng(11)
    adapters = [random_adapter(rng, {"q": 2}), random_adapter(rng, {"v": 2})]
    with pytest.raises(ValueError, match="no module 'q'"):
        flexlora_module_update(adapters, np.array([0.5, 0.5]), "q")
    with pytest.raises(ValueError, match="sum to 1"):
        flexlora_module_update(adapters, np.array([0.5, 0.6]), "q")
    with pytest.raises(ValueError, match="at least one"):
        flexlora_module_update([], np.array([]), "q")
