"""The robust-aggregation math (strategies/robust.py) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strategies.robust import (
    RobustConfig,
    capped_counts,
    change_norm,
    clip_factors,
    combine,
    coordinate_median,
    cosine_threshold,
    max_abs,
    median_direction_cosines,
    norm_threshold,
    pad_to,
    scale_change,
    trim_count,
    trimmed_mean,
)

# five clients, two coordinates; sorted per coordinate: (-50, 1, 2, 3, 100), (-3, 0, 4, 5, 10)
FIVE = [np.array(v, dtype=np.float32) for v in ([1, 10], [2, -3], [3, 0], [100, 4], [-50, 5])]


def test_coordinate_median_odd_and_even():
    np.testing.assert_array_equal(coordinate_median(FIVE), [2.0, 4.0])
    # the first four: the mean of the two middle values, (2, 3) -> 2.5 and (0, 4) -> 2
    np.testing.assert_array_equal(coordinate_median(FIVE[:4]), [2.5, 2.0])
    assert coordinate_median(FIVE).dtype == np.float32


def test_trimmed_mean_drops_k_per_side():
    # n = 5 at 0.2: k = 1: mean of (1, 2, 3) = 2 and of (0, 4, 5) = 3
    np.testing.assert_allclose(trimmed_mean(FIVE, 0.2), [2.0, 3.0])
    # n = 5 at 0.0: the plain mean: (1+2+3+100-50)/5 = 11.2, (10-3+0+4+5)/5 = 3.2
    np.testing.assert_allclose(trimmed_mean(FIVE, 0.0), [11.2, 3.2], rtol=1e-6)
    # n = 4 at 0.1: still one per side (ceil), the middle two: (2, 3) and (0, 4)
    np.testing.assert_allclose(trimmed_mean(FIVE[:4], 0.1), [2.5, 2.0])


@pytest.mark.parametrize(("n", "fraction", "k"), [
    (1, 0.2, 0), (2, 0.4, 0), (3, 0.1, 1), (4, 0.2, 1), (5, 0.2, 1), (8, 0.2, 2),
    (10, 0.1, 1), (10, 0.3, 3), (10, 0.0, 0), (6, 0.49, 2)])
def test_trim_count(n, fraction, k):
    assert trim_count(n, fraction) == k


def test_combine_dispatches_and_refuses_the_mean():
    np.testing.assert_array_equal(combine(FIVE, "median", 0.2), [2.0, 4.0])
    np.testing.assert_allclose(combine(FIVE, "trimmed-mean", 0.2), [2.0, 3.0])
    with pytest.raises(ValueError, match="'norm-clip' is not a coordinate-wise aggregator"):
        combine(FIVE, "norm-clip", 0.2)
    with pytest.raises(ValueError, match="share one shape"):
        combine([np.zeros(2), np.zeros(3)], "median", 0.2)


def test_change_norm_and_scale_change():
    ref = {"a": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "h": np.zeros(2, np.float32)}
    # the first row of "a" only (a lower rank), changed by (3, 4): norm 5; "h" by (0, 12)
    update = {"a": np.array([[4.0, 6.0]], np.float32), "h": np.array([0.0, 12.0], np.float32)}
    assert change_norm(update, ref) == 13.0
    half = scale_change(update, ref, 0.5)
    np.testing.assert_array_equal(half["a"], [[2.5, 4.0]])
    np.testing.assert_array_equal(half["h"], [0.0, 6.0])
    assert half["a"].dtype == np.float32
    assert scale_change(update, ref, 1.0)["a"] is update["a"]
    with pytest.raises(ValueError, match=r"\['x'\] were not sent"):
        change_norm({"x": np.zeros(1)}, ref)


def test_norm_threshold_clip_factors_and_capped_counts():
    assert norm_threshold([1.0, 2.0, 3.0, 100.0], 10.0) == 25.0  # median 2.5
    assert norm_threshold([1.0, 2.0], 0.0) is None  # off
    assert norm_threshold([0.0, 0.0, 5.0], 10.0) is None  # median 0: nothing to compare with
    assert norm_threshold([], 10.0) is None
    assert clip_factors([1.0, 4.0, 2.0], 2.0) == [1.0, 0.5, 1.0]
    assert capped_counts([40, 25, 20, 35]) == [30, 25, 20, 30]  # median 30
    assert capped_counts([1, 1_000_000, 3]) == [1, 3, 3]


def test_pad_to_and_max_abs():
    a = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(pad_to(a, (4, 3)), np.vstack([a, np.zeros((2, 3))]))
    assert pad_to(a, (2, 3)) is a
    with pytest.raises(ValueError, match="cannot be padded"):
        pad_to(a, (1, 3))
    assert max_abs({"x": np.array([1.0, -7.0]), "y": np.array([3.0])}) == ("x", 7.0)
    assert max_abs({}) == ("", 0.0)


def test_config_defaults_and_validation():
    config = RobustConfig()
    assert (config.aggregator, config.update_norm_bound, config.update_max_abs) == \
        ("mean", 10.0, 1e4)
    assert config.holds_round
    assert not RobustConfig(update_norm_bound=0, update_min_cosine=-1).holds_round
    assert RobustConfig(update_norm_bound=0).holds_round  # the direction screen holds it
    assert RobustConfig(update_norm_bound=0, aggregator="median").holds_round
    for kwargs, message in [
        ({"aggregator": "mode"}, "aggregator must be one of mean, median, trimmed-mean, "
                                 "norm-clip, got 'mode'"),
        ({"trim_fraction": 0.5}, r"trim-fraction must be in \[0, 0.5\), got 0.5"),
        ({"clip_norm": -1.0}, "clip-norm must be a finite number >= 0"),
        ({"update_norm_bound": 0.5}, "update-norm-bound must be 0 .off. or a finite number "
                                     ">= 1.*got 0.5"),
        ({"update_norm_bound": math.inf}, "update-norm-bound must be 0"),
        ({"update_max_abs": math.nan}, "update-max-abs must be a finite number >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            RobustConfig(**kwargs)


def test_median_direction_cosines_by_hand():
    zero = {"w": np.zeros(2)}
    updates = [{"w": np.array([1.0, 0.0])}, {"w": np.array([1.0, 1.0])},
               {"w": np.array([-1.0, 0.0])}]
    # per coordinate the median change is (1, 0): cosines 1, 1/sqrt(2), -1
    assert median_direction_cosines(updates, [zero] * 3, {"w": (2,)}) == pytest.approx(
        [1.0, 1 / np.sqrt(2), -1.0])
    # a lower-rank tensor is compared with its reference's leading block, then zero-padded
    lower = [{"w": np.array([2.0])}, {"w": np.array([1.0, 0.0])}, {"w": np.array([1.0, 5.0])}]
    refs = [{"w": np.array([1.0, 9.0])}, zero, zero]
    # changes (1, 0), (1, 0), (1, 5); median (1, 0)
    assert median_direction_cosines(lower, refs, {"w": (2,)}) == pytest.approx(
        [1.0, 1.0, 1 / np.sqrt(26)])
    # no change, or a zero median: nothing to judge by
    assert median_direction_cosines([zero, zero, {"w": np.array([1.0, 0.0])}], [zero] * 3,
                                    {"w": (2,)}) == [1.0, 1.0, 1.0]


def test_min_cosine_is_validated():
    for bad in (-1.5, 1.0, float("nan")):
        with pytest.raises(ValueError, match="update-min-cosine must be in"):
            RobustConfig(update_min_cosine=bad)
    assert "no direction screen" in RobustConfig(update_min_cosine=-1).describe()


def test_cosine_threshold_by_hand():
    # the median cosine of (0.2, 0.6, 0.7) is 0.6: half of it, 0.3, is above the floor 0
    assert cosine_threshold([0.2, 0.6, 0.7], 0.0, 0.5) == pytest.approx(0.3)
    # a round pointing nowhere in particular (median -0.1) leaves the absolute floor in charge
    assert cosine_threshold([-0.5, -0.1, 0.2], 0.0, 0.5) == 0.0
    assert cosine_threshold([0.2, 0.6, 0.7], -1.0, 0.0) == -1.0
    with pytest.raises(ValueError, match="update-cosine-ratio must be in"):
        RobustConfig(update_cosine_ratio=1.0)
