"""Empirical privacy audits: membership inference on losses and one-run epsilon lower bounds.

Why one module of about 430 lines: the two audits share their scoring and their
statistics (thresholds, Clopper-Pearson bounds); splitting them would duplicate those.

Two independent measurements of what a trained model leaks about its training data.

**Loss-threshold membership inference** (Yeom et al., "Privacy Risk in Machine Learning:
Analyzing the Connection to Overfitting", CSF 2018). The attacker calls an example a
member when the model's loss on it is low. :func:`loss_threshold_attack` reports the
attack's ROC AUC (computed exactly as the Mann-Whitney U statistic, ties counted 1/2),
its membership advantage (the largest TPR - FPR over thresholds, Yeom's measure) and its
TPR at low FPR. These are descriptive statistics of one attack, not privacy bounds.

**One-run auditing** (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023). ``m`` canaries are each included in the training data
with an independent fair coin. After training, the auditor scores every canary (e.g.
the negative loss), guesses "included" for the ``k+`` highest scores and "excluded" for
the ``k-`` lowest, and abstains on the rest. If training is (epsilon, delta)-DP with
respect to the canaries, the number of correct guesses among the ``r = k+ + k-`` is
stochastically dominated by the bound of the paper's Theorem 5.2 (its Appendix D
computes it as ``p_value_DP_audit``):

    P[v or more correct] <= P[W >= v] + 2 m delta max_{i=1..m} P[v > W >= v - i] / i,
    W ~ Binomial(r, e^epsilon / (1 + e^epsilon)).

:func:`one_run_p_value` evaluates this bound and :func:`one_run_epsilon_lower_bound`
returns the largest epsilon it rejects at level ``beta = 1 - confidence``.

What the bound means: with probability at least ``confidence`` over the canaries' coins
(and the training randomness), the whole training procedure, everything between the
canaries' inclusion and the released model, is *not* (epsilon', delta)-DP for any
epsilon' below the reported value. It is a lower bound on the epsilon of the procedure
for the canaries' inclusion (all rounds, all clients, aggregation, everything), to be set
beside the accountant's upper bound. A valid lower bound far below the theoretical
epsilon is the expected outcome of a one-run audit with a black-box, loss-based auditor:
the analysis is tight only for very strong auditors (white-box gradient canaries, many
canaries, high accuracy), and DP-SGD's worst case is rarely realised by natural data.
A lower bound *above* the accountant's epsilon would indicate a bug.

:func:`audit_canaries` applies the guesses for several abstention levels and keeps the
best bound. Choosing the best of ``K`` looks at the same data is a multiple comparison,
so each level is tested at ``beta / K`` (a union bound): the reported maximum then holds
at the stated confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.stats import binom

DEFAULT_FPRS = (0.1, 0.01)
# Default abstention grid: the fraction of canaries the auditor guesses on (half "in",
# half "out"); 1.0 guesses on every canary.
DEFAULT_GUESS_FRACTIONS = (0.1, 0.2, 0.5, 1.0)
EPSILON_TOLERANCE = 1e-6
_MAX_EPSILON = 1e3


# ---------------------------------------------------------------------------------------
# Loss-threshold membership inference
# ---------------------------------------------------------------------------------------


def _losses(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN")
    return array


def loss_threshold_auc(member_losses: Any, nonmember_losses: Any) -> float:
    """ROC AUC of the loss-threshold attack (lower loss => "member"), computed exactly.

    It is the Mann-Whitney U statistic over all member/non-member pairs, normalised:
    the fraction of pairs in which the member's loss is strictly lower than the
    non-member's, with ties counted 1/2. 1.0: every member below every non-member;
    0.5: no separation; 0.0: every member above. The pair counts are integers, so the
    value is exact (one division at the end); O(n log n).

    Raises:
        ValueError: an input is empty, not 1-D, or contains NaN.

    """
    members = _losses(member_losses, "member_losses")
    nonmembers = np.sort(_losses(nonmember_losses, "nonmember_losses"))
    below = np.searchsorted(nonmembers, members, side="left")  # non-members < member
    up_to = np.searchsorted(nonmembers, members, side="right")  # non-members <= member
    above = nonmembers.size - up_to  # non-members with a strictly higher loss: a win
    ties = up_to - below
    twice_u = int(np.sum(2 * above + ties, dtype=np.int64))
    return twice_u / (2 * members.size * nonmembers.size)


def tpr_at_fpr(member_losses: Any, nonmember_losses: Any, fpr: float) -> float:
    """Best TPR of a loss threshold (``loss < t`` => "member") whose FPR is at most ``fpr``.

    The threshold is the ``(k+1)``-th lowest non-member loss, ``k = floor(fpr * n)``:
    at most ``k`` non-members lie strictly below it, and any higher threshold would let
    ``k + 1`` through. No randomised thresholds.

    Raises:
        ValueError: ``fpr`` is outside [0, 1], or an input is invalid.

    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    members = _losses(member_losses, "member_losses")
    nonmembers = np.sort(_losses(nonmember_losses, "nonmember_losses"))
    allowed = math.floor(fpr * nonmembers.size + 1e-9)  # tolerate 0.29 * 100 = 28.999...
    if allowed >= nonmembers.size:
        return 1.0
    threshold = nonmembers[allowed]
    return float(np.count_nonzero(members < threshold)) / members.size


def attack_advantage(member_losses: Any, nonmember_losses: Any) -> float:
    """Yeom et al.'s membership advantage: the largest TPR - FPR over loss thresholds.

    Over the rules ``loss <= t`` for every observed loss ``t`` (and the empty rule, whose
    advantage is 0), so the value is in [0, 1].
    """
    members = np.sort(_losses(member_losses, "member_losses"))
    nonmembers = np.sort(_losses(nonmember_losses, "nonmember_losses"))
    thresholds = np.unique(np.concatenate([members, nonmembers]))
    tpr = np.searchsorted(members, thresholds, side="right") / members.size
    fpr = np.searchsorted(nonmembers, thresholds, side="right") / nonmembers.size
    return max(0.0, float(np.max(tpr - fpr)))


@dataclass(frozen=True)
class MembershipAttackResult:
    """The loss-threshold attack's statistics on one set of members and non-members.

    Attributes:
        auc: ROC AUC (:func:`loss_threshold_auc`).
        advantage: max TPR - FPR (:func:`attack_advantage`).
        tpr_at_fpr: TPR at each FPR level (:func:`tpr_at_fpr`), keyed by the level.
        num_members: number of member losses.
        num_nonmembers: number of non-member losses.

    """

    auc: float
    advantage: float
    tpr_at_fpr: dict[float, float]
    num_members: int
    num_nonmembers: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the FPR keys become strings)."""
        out = asdict(self)
        out["tpr_at_fpr"] = {str(k): v for k, v in self.tpr_at_fpr.items()}
        return out


def loss_threshold_attack(
    member_losses: Any, nonmember_losses: Any, fprs: Sequence[float] = DEFAULT_FPRS
) -> MembershipAttackResult:
    """AUC, advantage and TPR at each FPR of ``fprs`` for the loss-threshold attack."""
    members = _losses(member_losses, "member_losses")
    nonmembers = _losses(nonmember_losses, "nonmember_losses")
    return MembershipAttackResult(
        auc=loss_threshold_auc(members, nonmembers),
        advantage=attack_advantage(members, nonmembers),
        tpr_at_fpr={float(f): tpr_at_fpr(members, nonmembers, f) for f in fprs},
        num_members=members.size,
        num_nonmembers=nonmembers.size,
    )


# ---------------------------------------------------------------------------------------
# One-run auditing (Steinke, Nasr and Jagielski 2023)
# ---------------------------------------------------------------------------------------


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int, delta: float) -> None:
    for name, value in (("num_canaries", num_canaries), ("num_guesses", num_guesses),
                        ("num_correct", num_correct)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            "need 0 <= num_correct <= num_guesses <= num_canaries, got "
            f"{num_correct}, {num_guesses}, {num_canaries}"
        )
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")


def one_run_p_value(
    num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """P[at least ``num_correct`` correct of ``num_guesses``] if training is (eps, delta)-DP.

    The bound of Steinke et al.'s Theorem 5.2 (Appendix D's ``p_value_DP_audit``), with
    ``m`` canaries, ``r`` guesses, ``v`` correct and ``W ~ Binomial(r, q)``,
    ``q = e^eps / (1 + e^eps)`` (the accuracy of eps-DP randomised response)::

        beta  = P[W >= v]
        alpha = max_{i = 1..m} P[v > W >= v - i] / i
        p     = min(1, beta + 2 m delta alpha)

    The maximum runs over ``i = 1..v`` only: for ``i >= v`` the numerator is
    ``P[W < v]`` whatever ``i``, so ``i = v`` dominates the larger ``i``. ``alpha`` is
    accumulated as the recursion ``S_i = S_{i-1} + P[W = v - i]``,
    ``alpha_i = max(alpha_{i-1}, S_i / i)``, vectorised.

    Raises:
        TypeError: a count is not an integer.
        ValueError: the counts are inconsistent, or epsilon < 0 or delta outside [0, 1].

    """
    _check_counts(num_canaries, num_guesses, num_correct, delta)
    if not epsilon >= 0.0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    r, v = int(num_guesses), int(num_correct)
    q = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[W >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    window = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v > W >= v - i]
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(tail + 2.0 * num_canaries * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
    *,
    tolerance: float = EPSILON_TOLERANCE,
) -> float:
    """The largest epsilon that ``num_correct`` correct guesses of ``num_guesses`` rule out.

    An epsilon is ruled out when :func:`one_run_p_value` is at most
    ``beta = 1 - confidence``. If training were (eps', delta)-DP for some eps' below a
    ruled-out eps, it would also be (eps, delta)-DP, so every returned value is a valid
    lower bound whether or not the p-value is monotone in epsilon (for delta > 0 it need
    not be). Found by doubling an upper bracket, then bisection to ``tolerance``; the
    returned value is the low end, always one that was tested and ruled out (or 0, the
    trivial bound: an auditor at chance accuracy proves nothing).

    Raises:
        ValueError: invalid counts, delta, confidence or tolerance.

    """
    _check_counts(num_canaries, num_guesses, num_correct, delta)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not tolerance > 0.0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    beta = 1.0 - confidence

    def ruled_out(epsilon: float) -> bool:
        return one_run_p_value(num_canaries, num_guesses, num_correct, epsilon, delta) <= beta

    low, high = 0.0, 1.0
    while ruled_out(high):
        low, high = high, 2.0 * high
        if high > _MAX_EPSILON:  # q rounds to 1 long before: P[W >= v] = 1 > beta
            raise RuntimeError("epsilon search did not terminate")  # pragma: no cover
    while high - low > tolerance:
        middle = (low + high) / 2.0
        if ruled_out(middle):
            low = middle
        else:
            high = middle
    return low


def guesses_from_scores(scores: Any, k_plus: int, k_minus: int) -> np.ndarray:
    """The auditor's guesses: +1 ("in") for the highest scores, -1 ("out") for the lowest.

    The ``k_plus`` highest scores get +1, the ``k_minus`` lowest -1, the rest 0
    (abstain). Ties are broken by index (a stable sort), which does not look at the
    inclusion coins, so the guesses stay a function of the scores alone, as the
    analysis requires.

    Raises:
        ValueError: negative counts, or ``k_plus + k_minus`` above the number of scores.

    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > values.size:
        raise ValueError(
            f"need k_plus, k_minus >= 0 and k_plus + k_minus <= {values.size}, "
            f"got {k_plus}, {k_minus}"
        )
    order = np.argsort(values, kind="stable")  # ascending
    guesses = np.zeros(values.size, dtype=np.int8)
    guesses[order[:k_minus]] = -1
    if k_plus:
        guesses[order[values.size - k_plus:]] = 1
    return guesses


def default_k_values(num_canaries: int) -> tuple[int, ...]:
    """Guesses per side for :data:`DEFAULT_GUESS_FRACTIONS` of ``num_canaries``."""
    ks = {max(1, int(f * num_canaries) // 2) for f in DEFAULT_GUESS_FRACTIONS}
    return tuple(sorted(k for k in ks if 2 * k <= num_canaries))


@dataclass(frozen=True)
class GuessOutcome:
    """One abstention level of a one-run audit.

    Attributes:
        k: guesses per side (``k+ = k- = k``).
        num_guesses: ``r = 2k``.
        num_correct: ``v``, the guesses that match the inclusion coins.
        epsilon_lower_bound: the bound from this level alone, at the per-level confidence.

    """

    k: int
    num_guesses: int
    num_correct: int
    epsilon_lower_bound: float


@dataclass(frozen=True)
class AuditResult:
    """A one-run audit: the best epsilon lower bound over the abstention levels tried.

    Attributes:
        epsilon_lower_bound: the best bound; holds at ``confidence`` (union bound).
        best: the level that gave it (the first such level on ties).
        outcomes: every level tried, in the order of the k values.
        num_canaries: ``m``.
        num_included: canaries whose coin said "include".
        delta: the delta of the (epsilon, delta) hypothesis.
        confidence: the overall confidence ``1 - beta``.
        per_level_confidence: ``1 - beta / len(outcomes)``, each level's confidence.

    """

    epsilon_lower_bound: float
    best: GuessOutcome
    outcomes: tuple[GuessOutcome, ...]
    num_canaries: int
    num_included: int
    delta: float
    confidence: float
    per_level_confidence: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        out["outcomes"] = [asdict(o) for o in self.outcomes]
        return out


def audit_canaries(
    scores: Any,
    included: Any,
    delta: float,
    k_values: Sequence[int] | None = None,
    confidence: float = 0.95,
) -> AuditResult:
    """One-run audit from canary scores (higher = "more likely trained on") and coins.

    For every ``k`` of ``k_values`` (default :func:`default_k_values`) the auditor guesses
    "included" for the ``k`` highest scores and "excluded" for the ``k`` lowest
    (:func:`guesses_from_scores`); ``v`` counts the correct ones among ``r = 2k``, and
    :func:`one_run_epsilon_lower_bound` turns ``(m, r, v)`` into a bound at confidence
    ``1 - beta / K`` for ``K = len(k_values)``. The maximum over levels then holds at
    ``confidence``: the union bound over the ``K`` tests pays for picking the best.

    Args:
        scores: one score per canary; with a loss-based auditor, the negative loss.
        included: one bool per canary, True where its coin put it in the training data.
        delta: the delta of the hypothesis (use the delta the training was accounted at).
        k_values: guesses per side to try; each needs ``1 <= k`` and ``2k <= m``.
        confidence: overall confidence, ``1 - beta`` (the paper uses 0.95).

    Raises:
        ValueError: mismatched or invalid inputs.

    """
    values = np.asarray(scores, dtype=np.float64)
    coins = np.asarray(included)
    if values.ndim != 1 or coins.shape != values.shape:
        raise ValueError(
            f"scores and included must be 1-D and of the same length, got "
            f"{values.shape} and {coins.shape}"
        )
    if coins.dtype != np.bool_:
        raise ValueError(f"included must be boolean, got dtype {coins.dtype}")
    m = values.size
    ks = tuple(int(k) for k in (default_k_values(m) if k_values is None else k_values))
    if not ks:
        raise ValueError(f"no abstention level fits {m} canaries (need at least 2)")
    bad = [k for k in ks if k < 1 or 2 * k > m]
    if bad:
        raise ValueError(f"k values {bad} outside [1, {m // 2}] for {m} canaries")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    per_level = 1.0 - (1.0 - confidence) / len(ks)
    truth = np.where(coins, 1, -1)
    outcomes = []
    for k in ks:
        guesses = guesses_from_scores(values, k, k)
        correct = int(np.count_nonzero(guesses == truth))
        bound = one_run_epsilon_lower_bound(m, 2 * k, correct, delta, per_level)
        outcomes.append(GuessOutcome(k=k, num_guesses=2 * k, num_correct=correct,
                                     epsilon_lower_bound=bound))
    best = max(outcomes, key=lambda o: o.epsilon_lower_bound)  # first of equals
    return AuditResult(
        epsilon_lower_bound=best.epsilon_lower_bound,
        best=best,
        outcomes=tuple(outcomes),
        num_canaries=m,
        num_included=int(np.count_nonzero(coins)),
        delta=float(delta),
        confidence=float(confidence),
        per_level_confidence=per_level,
    )
