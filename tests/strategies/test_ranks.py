import random

import numpy as np
import pytest

from strategies.ranks import RankPlan, distribution_probabilities, parse_ranks


def test_heavy_tail_puts_most_clients_at_the_lowest_rank():
    p = distribution_probabilities("heavy-tail", 4)
    expected = np.array([1, 1 / 4, 1 / 9, 1 / 16]) / (1 + 1 / 4 + 1 / 9 + 1 / 16)
    np.testing.assert_allclose(p, expected)
    assert p[0] > 0.7


def test_fixed_uniform_normal():
    np.testing.assert_allclose(distribution_probabilities("fixed", 3), [0, 0, 1])
    np.testing.assert_allclose(distribution_probabilities("uniform", 4), [0.25] * 4)
    p = distribution_probabilities("normal", 5)
    assert p.argmax() == 2 and np.isclose(p[1], p[3])


def test_assignment_is_seeded_and_follows_the_distribution():
    plan = RankPlan(max_rank=16, distribution="heavy-tail", choices=(2, 4, 8, 16))
    a = plan.assign(range(1000), random.Random(0))
    b = plan.assign(range(1000), random.Random(0))
    assert a == b
    share_lowest = sum(r == 2 for r in a.values()) / 1000
    assert 0.65 < share_lowest < 0.76


def test_explicit_ranks_follow_sorted_node_ids():
    plan = RankPlan(max_rank=8, explicit=(2, 4, 8))
    assert plan.assign([30, 10, 20], random.Random(0)) == {10: 2, 20: 4, 30: 8}


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match="client rank 32 is above the maximum rank 16"):
        RankPlan(max_rank=16, choices=(2, 32))
    with pytest.raises(ValueError, match="lists 3 ranks but there are 4 clients"):
        RankPlan(max_rank=8, explicit=(2, 4, 8)).check_num_clients(4)
    with pytest.raises(ValueError, match="unknown rank distribution 'zipf'; known: fixed"):
        RankPlan(max_rank=8, distribution="zipf", choices=(2, 4))
    with pytest.raises(ValueError, match="client-ranks must be comma-separated"):
        parse_ranks("2,four", "client-ranks")
