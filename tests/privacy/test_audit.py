"""Empirical privacy audit math: the loss-threshold attack and one-run epsilon lower bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import binom

from privacy.audit import (
    attack_advantage,
    audit_canaries,
    default_k_values,
    guesses_from_scores,
    loss_threshold_attack,
    loss_threshold_auc,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    tpr_at_fpr,
)

# ---------------------------------------------------------------------------------------
# Loss-threshold attack
# ---------------------------------------------------------------------------------------


def slow_auc(members, nonmembers):
    """O(n^2) reference: the fraction of (member, non-member) pairs the member wins."""
    total = 0.0
    for a in members:
        for b in nonmembers:
            total += 1.0 if a < b else 0.5 if a == b else 0.0
    return total / (len(members) * len(nonmembers))


def test_auc_hand_computed_with_a_tie():
    # pairs (member, non-member): (1,2) win, (1,4) win, (2,2) tie, (2,4) win, (3,2) loss,
    # (3,4) win -> 4.5 / 6
    assert loss_threshold_auc([1.0, 2.0, 3.0], [2.0, 4.0]) == 0.75


def test_auc_extremes_and_symmetry():
    assert loss_threshold_auc([0.1, 0.2, 0.3], [0.4, 0.5]) == 1.0
    assert loss_threshold_auc([0.4, 0.5], [0.1, 0.2, 0.3]) == 0.0
    same = [0.3, 1.2, 0.3, 2.5, 0.7]
    assert loss_threshold_auc(same, same) == 0.5  # every pair and its mirror cancel
    assert loss_threshold_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5  # all ties


def test_auc_equals_pairwise_reference_on_random_data():
    rng = np.random.default_rng(7)
    for _ in range(5):
        # rounded so that many ties occur, across and within the two groups
        members = np.round(rng.normal(0.0, 1.0, size=int(rng.integers(1, 60))), 1)
        nonmembers = np.round(rng.normal(0.4, 1.0, size=int(rng.integers(1, 60))), 1)
        auc = loss_threshold_auc(members, nonmembers)
        assert auc == pytest.approx(slow_auc(members, nonmembers), abs=1e-12)
        # swapping the roles mirrors the AUC
        assert loss_threshold_auc(nonmembers, members) == pytest.approx(1.0 - auc, abs=1e-12)


MEMBERS = [0.1, 0.2, 0.5, 0.9]
NONMEMBERS = [1.4, 0.15, 0.4, 0.6, 0.7, 0.8, 1.0, 1.1, 1.2, 1.3]  # 10, unsorted on purpose


@pytest.mark.parametrize(("fpr", "expected"), [
    (0.0, 0.25),  # threshold 0.15 (lowest non-member): only 0.1 below it
    (0.01, 0.25),  # floor(0.1) = 0 non-members allowed: same threshold
    (0.1, 0.5),  # 1 allowed: threshold 0.4 -> 0.1, 0.2
    (0.3, 0.75),  # 3 allowed: threshold 0.7 -> 0.1, 0.2, 0.5
    (1.0, 1.0),
])
def test_tpr_at_fpr_hand_computed(fpr, expected):
    assert tpr_at_fpr(MEMBERS, NONMEMBERS, fpr) == expected


def test_tpr_at_fpr_never_exceeds_the_fpr_and_is_float_robust():
    nonmembers = np.arange(100, dtype=float)
    # 0.29 * 100 = 28.999... in floating point: still 29 non-members allowed (0..28)
    assert tpr_at_fpr([28.5], nonmembers, 0.29) == 1.0
    assert tpr_at_fpr([29.5], nonmembers, 0.29) == 0.0
    rng = np.random.default_rng(3)
    members, nonmembers = rng.normal(size=50), rng.normal(size=70)
    for fpr in (0.01, 0.1, 0.25):
        tpr = tpr_at_fpr(members, nonmembers, fpr)
        # the threshold it implies lets at most floor(fpr * n) non-members through
        threshold = np.sort(nonmembers)[math.floor(fpr * 70)]
        assert np.mean(nonmembers < threshold) <= fpr
        assert tpr == np.mean(members < threshold)


def test_advantage_hand_computed():
    # rule loss <= 0.5: TPR 3/4, FPR 2/10 (0.15, 0.4) -> 0.55, the best threshold
    assert attack_advantage(MEMBERS, NONMEMBERS) == pytest.approx(0.55, abs=1e-12)
    assert attack_advantage([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert attack_advantage([0.3, 0.4], [0.1, 0.2]) == 0.0  # the empty rule: 0
    # a tie at the threshold catches the non-member too: loss <= 1 is TPR 1, FPR 1/2
    assert attack_advantage([1.0, 1.0], [1.0, 2.0]) == 0.5


def test_attack_bundle_and_validation():
    result = loss_threshold_attack(MEMBERS, NONMEMBERS)
    # per member, non-members with a strictly higher loss: 10 + 9 + 8 + 5 = 32 of 40
    assert result.auc == 0.8
    assert result.advantage == pytest.approx(0.55)
    assert result.tpr_at_fpr == {0.1: 0.5, 0.01: 0.25}
    assert (result.num_members, result.num_nonmembers) == (4, 10)
    assert result.as_dict()["tpr_at_fpr"] == {"0.1": 0.5, "0.01": 0.25}
    with pytest.raises(ValueError, match="NaN"):
        loss_threshold_auc([0.1, float("nan")], [0.2])
    with pytest.raises(ValueError, match="non-empty"):
        loss_threshold_auc([], [0.2])
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr([0.1], [0.2], 1.5)


# ---------------------------------------------------------------------------------------
# One-run auditing: the p-value and the epsilon lower bound
# ---------------------------------------------------------------------------------------


def test_p_value_reproduces_the_papers_example():
    # Steinke et al., App. D: m = r = 100, v = 75, eps = log 3 (q = 3/4), delta = 0
    p = one_run_p_value(100, 100, 75, math.log(3), 0.0)
    assert p == pytest.approx(binom.sf(74, 100, 0.75), rel=1e-12)
    assert p == pytest.approx(0.553, abs=5e-4)


@pytest.mark.parametrize(("m", "r", "v", "delta", "published"), [
    # Steinke, Nasr & Jagielski (arXiv 2305.08846), App. D's worked example at 95%:
    (100, 100, 75, 0.0, 0.702),
    (100, 100, 75, 1e-4, 0.699),
    (1000, 100, 75, 1e-4, 0.673),  # the same 75/100, now abstaining on 900 of 1000
    # Sec. 7 (Fig. 11), printed truncated as 2.675
    (100_000, 1510, 1439, 1e-5, 2.6755),
])
def test_epsilon_bound_reproduces_published_values(m, r, v, delta, published):
    assert one_run_epsilon_lower_bound(m, r, v, delta, 0.95) == pytest.approx(
        published, abs=5e-4)


def slow_p_value(m, r, v, eps, delta):
    """Theorem 5.2's bound term by term, with the max over every i = 1..m."""
    q = math.exp(eps) / (1.0 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max(sum(pmf[max(0, v - i):v]) / i for i in range(1, m + 1))
    return min(1.0, tail + 2 * m * delta * alpha)


@pytest.mark.parametrize(("m", "r", "v", "eps", "delta"), [
    (200, 60, 45, 0.7, 1e-3),
    (80, 80, 41, 0.1, 1e-2),
    (50, 20, 20, 2.0, 1e-3),
    (300, 10, 3, 0.5, 1e-4),
])
def test_p_value_matches_term_by_term_theorem(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        slow_p_value(m, r, v, eps, delta), rel=1e-9)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_guesses_give_the_closed_form(r):
    # delta = 0, v = r: P[W >= r] = q^r <= beta  <=>  eps <= logit(beta^(1/r))
    expected = logit(0.05 ** (1.0 / r))
    bound = one_run_epsilon_lower_bound(1000, r, r, 0.0, 0.95)
    assert bound == pytest.approx(expected, abs=2e-6)
    assert bound <= expected  # the conservative end of the bisection


@pytest.mark.parametrize(("r", "v"), [(50, 40), (200, 130), (1000, 560), (1000, 999)])
def test_delta_zero_matches_direct_binomial_tail(r, v):
    # independently: the root of P[Binomial(r, expit(eps)) >= v] = beta
    root = brentq(lambda e: binom.sf(v - 1, r, expit(e)) - 0.05, 0.0, 50.0, xtol=1e-12)
    assert one_run_epsilon_lower_bound(5000, r, v, 0.0, 0.95) == pytest.approx(root, abs=2e-6)


@pytest.mark.parametrize("delta", [0.0, 1e-5])
@pytest.mark.parametrize(("r", "v"), [(100, 50), (1000, 500), (1000, 520), (100, 30), (10, 0)])
def test_chance_accuracy_proves_nothing(r, v, delta):
    assert one_run_epsilon_lower_bound(1000, r, v, delta) == 0.0


def test_bound_grows_with_correct_guesses_and_with_guesses_at_fixed_accuracy():
    by_correct = [one_run_epsilon_lower_bound(1000, 200, v, 1e-5) for v in (120, 140, 160, 180)]
    assert all(a < b for a, b in zip(by_correct, by_correct[1:], strict=False))
    by_guesses = [one_run_epsilon_lower_bound(10_000, r, int(0.8 * r), 1e-5)
                  for r in (50, 100, 500, 2000)]
    assert all(a < b for a, b in zip(by_guesses, by_guesses[1:], strict=False))


def test_delta_lowers_the_bound_and_more_canaries_cost_more():
    plain = one_run_epsilon_lower_bound(1000, 500, 400, 0.0)
    with_delta = one_run_epsilon_lower_bound(1000, 500, 400, 1e-4)
    assert with_delta < plain
    # the delta term is 2 m delta alpha: abstaining on more canaries weakens the bound
    assert one_run_epsilon_lower_bound(100_000, 500, 400, 1e-4) < with_delta


def test_returned_bound_is_rejected_and_just_above_is_not():
    eps = one_run_epsilon_lower_bound(1000, 300, 210, 1e-5, 0.95)
    assert eps > 0.0
    assert one_run_p_value(1000, 300, 210, eps, 1e-5) <= 0.05
    assert one_run_p_value(1000, 300, 210, eps + 1e-5, 1e-5) > 0.05
    # higher confidence, smaller bound
    assert one_run_epsilon_lower_bound(1000, 300, 210, 1e-5, 0.99) < eps


def test_one_run_input_validation():
    with pytest.raises(ValueError, match="num_correct <= num_guesses"):
        one_run_epsilon_lower_bound(100, 10, 11, 0.0)
    with pytest.raises(ValueError, match="num_guesses <= num_canaries"):
        one_run_epsilon_lower_bound(10, 20, 5, 0.0)
    with pytest.raises(TypeError, match="integer"):
        one_run_epsilon_lower_bound(100, 10.0, 5, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        one_run_epsilon_lower_bound(100, 10, 5, 0.0, confidence=1.0)
    with pytest.raises(ValueError, match="delta"):
        one_run_p_value(100, 10, 5, 1.0, -0.1)
    with pytest.raises(ValueError, match="epsilon"):
        one_run_p_value(100, 10, 5, -1.0, 0.0)


# ---------------------------------------------------------------------------------------
# The auditor: guesses and the audit over abstention levels
# ---------------------------------------------------------------------------------------


def test_guesses_hand_computed_and_ties_by_index():
    guesses = guesses_from_scores([0.3, 0.9, 0.1, 0.5, 0.7], k_plus=2, k_minus=1)
    assert guesses.tolist() == [0, 1, -1, 0, 1]
    assert guesses_from_scores([1.0, 1.0, 1.0, 1.0], 1, 1).tolist() == [-1, 0, 0, 1]
    assert guesses_from_scores([2.0, 1.0], 0, 0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="k_plus"):
        guesses_from_scores([1.0, 2.0], 2, 1)


def test_default_k_values():
    assert default_k_values(1000) == (50, 100, 250, 500)
    assert default_k_values(10) == (1, 2, 5)
    assert default_k_values(1) == ()


def _coins(m, seed):
    return np.random.default_rng(seed).random(m) < 0.5


def test_perfect_auditor_gets_the_union_bounded_closed_form():
    included = _coins(1000, 0)
    scores = np.where(included, 1.0, -1.0) + np.random.default_rng(1).normal(0, 0.01, 1000)
    result = audit_canaries(scores, included, delta=0.0, k_values=(50, 100, 200))
    assert result.per_level_confidence == pytest.approx(1 - 0.05 / 3)
    assert result.num_included == int(included.sum())
    for outcome in result.outcomes:
        assert outcome.num_correct == outcome.num_guesses == 2 * outcome.k  # all right
        expected = logit((0.05 / 3) ** (1.0 / (2 * outcome.k)))
        assert outcome.epsilon_lower_bound == pytest.approx(expected, abs=2e-6)
    assert result.best.k == 200
    assert result.epsilon_lower_bound == result.best.epsilon_lower_bound
    # the union bound costs something: level 200 alone at 95% would claim more
    alone = one_run_epsilon_lower_bound(1000, 400, 400, 0.0, 0.95)
    assert result.epsilon_lower_bound < alone


def test_audit_counts_correct_guesses_like_a_direct_count():
    rng = np.random.default_rng(5)
    included = _coins(400, 6)
    scores = included * 0.5 + rng.normal(size=400)  # a weak, noisy signal
    result = audit_canaries(scores, included, delta=1e-5)
    assert [o.k for o in result.outcomes] == list(default_k_values(400))
    order = np.argsort(scores)
    for outcome in result.outcomes:
        k = outcome.k
        correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
        assert outcome.num_correct == correct
        assert outcome.epsilon_lower_bound == one_run_epsilon_lower_bound(
            400, 2 * k, correct, 1e-5, result.per_level_confidence)
    assert result.as_dict()["outcomes"][0]["k"] == result.outcomes[0].k


def test_scores_independent_of_inclusion_rarely_give_a_positive_bound():
    # a valid 95% bound is positive with probability <= 5% when nothing leaks
    positives = 0
    for seed in range(20):
        included = _coins(200, seed)
        scores = np.random.default_rng(1000 + seed).normal(size=200)
        positives += audit_canaries(scores, included, delta=1e-5).epsilon_lower_bound > 0
    assert positives <= 3


def test_audit_validation():
    with pytest.raises(ValueError, match="same length"):
        audit_canaries(np.zeros(4), np.zeros(3, dtype=bool), delta=0.0)
    with pytest.raises(ValueError, match="boolean"):
        audit_canaries(np.zeros(4), np.zeros(4), delta=0.0)
    with pytest.raises(ValueError, match="outside"):
        audit_canaries(np.zeros(4), np.zeros(4, dtype=bool), delta=0.0, k_values=(3,))
    with pytest.raises(ValueError, match="no abstention level"):
        audit_canaries(np.zeros(1), np.zeros(1, dtype=bool), delta=0.0)
