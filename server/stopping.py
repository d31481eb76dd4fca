"""Why a run stops before its last round, or ends without having trained."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies.errors import BUDGET_REFUSAL_CODE


def budgets_spent(stats: Any) -> bool:
    """Whether every failed client of a round refused because its privacy budget is spent."""
    codes = getattr(stats, "failure_codes", {})
    return bool(codes) and stats.failed == len(codes) and \
        all(code == BUDGET_REFUSAL_CODE for code in codes.values())


def no_update_accepted(history: Mapping[int, Any], first_round: int) -> str | None:
    """Why no round from ``first_round`` on accepted any client update, or None if one did.

    A run whose every client failed (or was rejected) in every round has trained
    nothing; the message quotes the first failure so the cause is on screen.
    """
    rounds = [stats for r, stats in sorted(history.items()) if r >= first_round]
    if not rounds or any(stats.accepted > 0 for stats in rounds):
        return None
    failures = [f for stats in rounds for f in (*stats.failures, *stats.rejections)]
    aborted = [reason for stats in rounds
               if (reason := stats.details.get("secure_aggregation", {}).get("aborted"))]
    if failures:
        first = f"; first: node {failures[0][0]}: {failures[0][1]}"
    elif aborted:
        first = f"; secure aggregation aborted: {aborted[0]}"
    else:
        first = "; no client replied"
    failed = sum(s.failed for s in rounds)
    rejected = sum(s.rejected for s in rounds)
    return (f"no client update was accepted in any of {len(rounds)} round(s) ({failed} "
            f"failed, {rejected} rejected){first}")


def reason_to_stop(history: Mapping[int, Any], server_round: int,
                   max_failed_rounds: int) -> str | None:
    """Why the run must stop after ``server_round``, or None to go on.

    It stops when every sampled client failed with the same error in this round (the
    next round would fail the same way), when every client refused to train past its
    privacy budget (nothing is left to train; not a failure), or after
    ``max_failed_rounds`` rounds in a row without an accepted update (0 = never).
    """
    stats = history.get(server_round)
    if stats is None or stats.accepted > 0:
        return None
    reasons = {reason for _, reason in stats.failures}
    if stats.sampled > 0 and stats.failed == stats.sampled and budgets_spent(stats):
        return (f"the run stopped after round {server_round}: every client refused to "
                "train past its privacy budget (the epsilon each one allows is spent)")
    if stats.sampled > 0 and stats.failed == stats.sampled and len(reasons) == 1:
        return (f"the run stopped after round {server_round}: every client ("
                f"{stats.failed}) failed with the same error: {reasons.pop()}")
    limit = max_failed_rounds
    empty = [r for r in range(server_round - limit + 1, server_round + 1)
             if (s := history.get(r)) is not None and s.accepted == 0]
    if limit > 0 and len(empty) >= limit:
        detail = no_update_accepted({r: history[r] for r in empty}, empty[0])
        return (f"the run stopped after round {server_round}: {limit} round(s) in a row "
                f"without an accepted update: {detail}")
    return None
