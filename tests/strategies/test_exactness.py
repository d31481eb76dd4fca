import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.exactness import aggregation_error, sum_of_products_norm
from strategies.fedit import fedit_aggregate


def _adapter(A, B, alpha=2.0):
    return LoraAdapter({"m": LoraFactors(np.asarray(A, float), np.asarray(B, float))}, alpha)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 7), st.integers(2, 7), st.integers(0, 10_000))
def test_sum_of_products_norm_equals_dense(n, d, k, seed):
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, 4, size=n)
    Bs = [rng.standard_normal((d, r)) for r in ranks]
    As = [rng.standard_normal((r, k)) for r in ranks]
    c = rng.standard_normal(n)
    dense = sum(ci * b @ a for ci, b, a in zip(c, Bs, As, strict=True))
    assert np.isclose(sum_of_products_norm(Bs, As, c), np.linalg.norm(dense), rtol=1e-9)


def test_fedit_error_matches_the_hand_computed_example():
    # from test_fedit: avg(B)avg(A) = [[4,5,6],[20,25,30]], avg(BA) = [[1,2,3],[17,22,27]]
    c1 = _adapter([[1, 2, 3]], [[4], [8]])
    c2 = _adapter([[5, 6, 7]], [[0], [4]])
    agg = fedit_aggregate([c1, c2], [10, 30])
    err = aggregation_error(agg, [c1, c2], np.array([0.25, 0.75]))["m"]
    diff = np.array([[3, 3, 3], [3, 3, 3]])
    ref = np.array([[1, 2, 3], [17, 22, 27]])
    assert np.isclose(err, np.linalg.norm(diff) / np.linalg.norm(ref))


def test_shared_a_makes_the_average_exact():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 5))
    clients = [_adapter(A, rng.standard_normal((4, 3))) for _ in range(3)]
    agg = fedit_aggregate(clients, [1, 2, 3])
    err = aggregation_error(agg, clients, np.array([1, 2, 3]) / 6)["m"]
    assert err < 1e-12


def test_identical_clients_have_no_error_and_zero_updates_are_zero():
    c = _adapter([[1.0, 2.0]], [[3.0]])
    assert aggregation_error(c, [c, c], np.array([0.5, 0.5]))["m"] < 1e-12
    z = _adapter([[0.0, 0.0]], [[0.0]])
    assert aggregation_error(z, [z], np.array([1.0]))["m"] == 0.0
