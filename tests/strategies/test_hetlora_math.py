from __future__ import annotations

import math

import numpy as np
import pytest

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.hetlora_math import (
    check_weights,
    hetlora_aggregate,
    kept_rank,
    pad_adapter,
    pad_factors,
    product_norm,
    pruned_rank,
    sparsity_weights,
    tail_norms,
    truncate_adapter,
    truncate_factors,
)
from tests.conftest import random_adapter


def _f(a, b, dtype=np.float32) -> LoraFactors:
    return LoraFactors(A=np.array(a, dtype=dtype), B=np.array(b, dtype=dtype))


# --- truncation and padding ------------------------------------------------------------


def test_pad_then_truncate_round_trips_exactly():
    rng = np.random.default_rng(0)
    adapter = random_adapter(rng, {"q": 2, "v": 3})
    padded = pad_adapter(adapter, 8)
    assert padded.ranks == {"q": 8, "v": 8}
    back = truncate_adapter(padded, 2)
    np.testing.assert_array_equal(back.modules["q"].A, adapter.modules["q"].A)
    np.testing.assert_array_equal(back.modules["q"].B, adapter.modules["q"].B)
    f = adapter.modules["v"]
    g = truncate_factors(pad_factors(f, 5), 3)
    np.testing.assert_array_equal(g.A, f.A)
    np.testing.assert_array_equal(g.B, f.B)
    assert g.A.dtype == np.float32 and g.B.dtype == np.float32


def test_padding_keeps_product_and_adds_zeros():
    rng = np.random.default_rng(1)
    f = random_adapter(rng, {"q": 3}).modules["q"]
    p = pad_factors(f, 7)
    np.testing.assert_array_equal(p.B @ p.A, f.B @ f.A)
    assert not p.A[3:].any() and not p.B[:, 3:].any()
    assert p.A.dtype == f.A.dtype


def test_truncation_keeps_leading_rows_and_columns():
    f = _f(a=[[1, 2], [3, 4], [5, 6]], b=[[1, 2, 3]])
    t = truncate_factors(f, 2)
    np.testing.assert_array_equal(t.A, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(t.B, [[1, 2]])


def test_adapter_helpers_copy_extras_and_keep_alpha():
    rng = np.random.default_rng(2)
    adapter = random_adapter(rng, {"q": 4})
    for out in (pad_adapter(adapter, 6), truncate_adapter(adapter, 2)):
        assert out.alpha == adapter.alpha
        for key, value in adapter.extras.items():
            np.testing.assert_array_equal(out.extras[key], value)
            assert out.extras[key] is not value


@pytest.mark.parametrize("rank", [0, 5])
def test_truncate_rejects_bad_rank_naming_both_numbers(rank):
    f = _f(a=np.ones((4, 2)), b=np.ones((3, 4)))
    with pytest.raises(ValueError, match=rf"rank 4 to rank {rank}"):
        truncate_factors(f, rank)


def test_pad_rejects_smaller_rank():
    f = _f(a=np.ones((4, 2)), b=np.ones((3, 4)))
    with pytest.raises(ValueError, match="rank 4 to the smaller rank 3"):
        pad_factors(f, 3)


# --- norms and sparsity weights --------------------------------------------------------


def test_product_norm_matches_dense_frobenius_norm():
    rng = np.random.default_rng(3)
    f = random_adapter(rng, {"q": 5}, in_f=9, out_f=7).modules["q"]
    dense = np.linalg.norm(f.B.astype(np.float64) @ f.A.astype(np.float64))
    assert product_norm(f) == pytest.approx(dense, rel=1e-12)
    assert product_norm(_f(a=np.zeros((2, 3)), b=np.zeros((4, 2)))) == 0.0


def test_sparsity_weights_hand_computed():
    # client 1 (alpha 4): m rank 2, B A = diag(3, 4, 0) -> ||BA|| = 5, scale 4/2 = 2 -> 10
    #                     n rank 1, B A has one entry 2 -> ||BA|| = 2, scale 4/1 = 4 -> 8
    #                     sum over modules: 18
    # client 2 (alpha 4): m rank 1, B A has one entry 6 -> 6, scale 4 -> 24
    #                     n rank 2, B = 0 -> 0;  sum: 24
    # weights: 18/42 = 3/7 and 24/42 = 4/7
    c1 = LoraAdapter(
        modules={
            "m": _f(a=[[1, 0, 0], [0, 1, 0]], b=[[3, 0], [0, 4], [0, 0]]),
            "n": _f(a=[[0, 0, 2]], b=[[1], [0], [0]]),
        },
        alpha=4.0,
    )
    c2 = LoraAdapter(
        modules={
            "m": _f(a=[[1, 0, 0]], b=[[0], [6], [0]]),
            "n": _f(a=[[1, 0, 0], [0, 1, 0]], b=np.zeros((3, 2))),
        },
        alpha=4.0,
    )
    np.testing.assert_allclose(sparsity_weights([c1, c2]), [3 / 7, 4 / 7], rtol=1e-12)


def test_sparsity_weights_fall_back_to_uniform_when_all_norms_are_zero():
    zero = LoraAdapter(modules={"m": _f(a=np.ones((2, 3)), b=np.zeros((3, 2)))}, alpha=8.0)
    np.testing.assert_allclose(sparsity_weights([zero, zero, zero]), [1 / 3] * 3)


def test_sparsity_weights_reject_empty():
    with pytest.raises(ValueError, match="at least one"):
        sparsity_weights([])


# --- aggregation -----------------------------------------------------------------------


def test_hetlora_aggregate_hand_computed_ranks_1_and_2():
    c1 = LoraAdapter(
        modules={"m": _f(a=[[1, 2, 3]], b=[[4], [8]])},
        alpha=4.0, extras={"head": np.array([1, 1], dtype=np.float32)},
    )
    c2 = LoraAdapter(
        modules={"m": _f(a=[[5, 6, 7], [1, 1, 1]], b=[[0, 2], [4, -2]])},
        alpha=4.0, extras={"head": np.array([3, -1], dtype=np.float32)},
    )
    out = hetlora_aggregate([c1, c2], np.array([0.25, 0.75]), max_rank=2)
    # c1 padded: A = [[1,2,3],[0,0,0]], B = [[4,0],[8,0]]
    # A: 0.25*[[1,2,3],[0,0,0]] + 0.75*[[5,6,7],[1,1,1]] = [[4,5,6],[0.75,0.75,0.75]]
    np.testing.assert_allclose(out.modules["m"].A, [[4, 5, 6], [0.75, 0.75, 0.75]])
    # B: 0.25*[[4,0],[8,0]] + 0.75*[[0,2],[4,-2]] = [[1,1.5],[5,-1.5]]
    np.testing.assert_allclose(out.modules["m"].B, [[1, 1.5], [5, -1.5]])
    # head: 0.25*[1,1] + 0.75*[3,-1] = [2.5,-0.5]
    np.testing.assert_allclose(out.extras["head"], [2.5, -0.5])
    assert out.alpha == 4.0
    assert out.modules["m"].A.dtype == np.float32 and out.extras["head"].dtype == np.float32

    wider = hetlora_aggregate([c1, c2], np.array([0.25, 0.75]), max_rank=3)
    assert wider.ranks == {"m": 3}
    np.testing.assert_allclose(wider.modules["m"].A[:2], out.modules["m"].A)
    assert not wider.modules["m"].A[2].any() and not wider.modules["m"].B[:, 2].any()


@pytest.mark.parametrize(
    "weights", [[0.5, 0.6], [1.0], [[0.5, 0.5]], [1.5, -0.5], [np.nan, 1.0]]
)
def test_hetlora_aggregate_rejects_bad_weights(weights):
    rng = np.random.default_rng(4)
    adapters = [random_adapter(rng, {"q": 2}) for _ in range(2)]
    with pytest.raises(ValueError):
        hetlora_aggregate(adapters, np.array(weights), max_rank=2)


def test_hetlora_aggregate_rejects_rank_above_max_and_mismatched_alpha():
    rng = np.random.default_rng(5)
    a = random_adapter(rng, {"q": 4})
    b = random_adapter(rng, {"q": 2}, alpha=16.0)
    with pytest.raises(ValueError, match="rank 4 to the smaller rank 2"):
        hetlora_aggregate([a, a], np.array([0.5, 0.5]), max_rank=2)
    with pytest.raises(ValueError, match="alpha"):
        hetlora_aggregate([a, b], np.array([0.5, 0.5]), max_rank=4)


def test_check_weights_accepts_normalised_weights():
    np.testing.assert_array_equal(check_weights([0.2, 0.8], 2), [0.2, 0.8])
    with pytest.raises(ValueError, match="expected 3 weights"):
        check_weights([0.2, 0.8], 3)


# --- tail norms and rank pruning -------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "gamma", "kept"),
    [(4, 0.5, 2), (10, 0.7, 7), (8, 0.99, 7), (4, 0.05, 1), (2, 0.99, 1), (1, 0.5, 1)],
)
def test_kept_rank_is_floor_of_gamma_r_clamped(rank, gamma, kept):
    assert kept_rank(rank, gamma) == kept


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.1, 1.5])
def test_gamma_outside_open_unit_interval_is_rejected(gamma):
    with pytest.raises(ValueError, match="gamma"):
        tail_norms(_f(a=np.ones((4, 2)), b=np.ones((3, 4))), gamma)


def test_zero_tail_shrinks_rank():
    # rank 4, gamma 0.5 -> tail = indices 2, 3, all zero
    f = _f(a=[[1, 0], [0, 1], [0, 0], [0, 0]], b=[[1, 2, 0, 0], [3, 4, 0, 0]])
    assert tail_norms(f, 0.5) == (0.0, 0.0)
    assert pruned_rank(f, gamma=0.5, threshold=0.01) == 2


def test_large_tail_keeps_rank_and_threshold_is_relative():
    # A = I_4, B = [[1,0,3,0],[0,1,0,4]]; tail = indices 2, 3:
    # ||B_tail|| = 5, ||A_tail|| = sqrt(2); ||B|| = sqrt(27), ||A|| = 2
    # ratio = 5 sqrt(2) / (2 sqrt(27)) = 0.6804...
    f = _f(a=np.eye(4), b=[[1, 0, 3, 0], [0, 1, 0, 4]])
    b_tail, a_tail = tail_norms(f, 0.5)
    assert b_tail == pytest.approx(5.0)
    assert a_tail == pytest.approx(math.sqrt(2))
    assert pruned_rank(f, gamma=0.5, threshold=0.5) == 4
    assert pruned_rank(f, gamma=0.5, threshold=0.9) == 2
    # scale-free: rescaling A and B does not change the decision
    scaled = _f(a=1e-3 * np.eye(4), b=1e4 * np.array([[1, 0, 3, 0], [0, 1, 0, 4]]))
    assert pruned_rank(scaled, gamma=0.5, threshold=0.5) == 4
    assert pruned_rank(scaled, gamma=0.5, threshold=0.9) == 2


def test_rank_one_never_shrinks():
    f = _f(a=[[0, 0]], b=[[0], [0]])
    assert tail_norms(f, 0.5) == (0.0, 0.0)
    assert pruned_rank(f, gamma=0.5, threshold=1e9) == 1
    g = _f(a=[[1.0, 2.0]], b=[[3.0], [4.0]])
    assert pruned_rank(g, gamma=0.1, threshold=1e9) == 1


def test_rank_two_shrinks_to_one_at_most():
    f = _f(a=[[1, 0], [0, 0]], b=[[1, 0], [0, 0]])
    assert pruned_rank(f, gamma=0.01, threshold=0.5) == 1


def test_all_zero_factors_keep_rank_and_negative_threshold_is_rejected():
    f = _f(a=np.zeros((4, 2)), b=np.zeros((3, 4)))
    assert pruned_rank(f, gamma=0.5, threshold=0.5) == 4
    with pytest.raises(ValueError, match="threshold"):
        pruned_rank(f, gamma=0.5, threshold=-1.0)
