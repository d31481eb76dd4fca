from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.adapter import LoraFactors
from strategies.flexlora_math import (
    dense_svd,
    factored_svd,
    flexlora_module_update,
    split_singular_values,
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
