"""Differential-privacy settings and the privacy ledger of a client, on Opacus' accountants.

The accounting itself is Opacus': :class:`PrivacyLedger` keeps the history Opacus'
accountants work from (``(noise_multiplier, sample_rate, steps)`` entries) and asks an
:mod:`opacus.accountants` instance for epsilon, so epsilon is cumulative over every
recorded round of a run. This module computes no privacy bound of its own.

A client keeps one ledger for its own partition across the rounds it takes part in
(sample-level DP of that partition). Its :meth:`PrivacyLedger.state_dict` is plain JSON
(lists, numbers and a string), so it can be kept as a string in Flower's
``context.state`` and survive a restart.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

import privacy.opacus_import  # noqa: F401 - takes off the root log handler Opacus adds

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_accountant(name: str) -> None:
    _check(name in ACCOUNTANTS,
           f"accountant must be one of {tuple(ACCOUNTANTS)}, got '{name}'")


@dataclass(frozen=True, kw_only=True)
class DPSettings:
    """DP-SGD on a client: clipping, noise (or a target epsilon), delta, accountant, budget.

    Attributes:
        noise_multiplier: std of the Gaussian noise over the clip norm; 0 adds no noise
            (epsilon is then infinite). Exactly one of this and ``target_epsilon``.
        target_epsilon: the noise is chosen so that the planned steps reach this epsilon
            at ``delta`` (see :func:`noise_for_target`).
        delta: the delta of (epsilon, delta)-DP; must be below 1/n for a partition of n
            examples (:meth:`check_delta`).
        max_grad_norm: the per-example gradient clip norm (L2, over all trained parameters).
        accountant: ``rdp`` or ``prv`` (Opacus' RDP or PRV accountant).
        epsilon_budget: refuse to train a round after which epsilon would exceed this;
            None for no limit.
        secure_mode: use Opacus' secure mode (cryptographically secure RNG for noise and
            sampling, which needs the ``torchcsprng`` package); a node asks for it with
            its node config ``dp-secure-mode`` (:mod:`client.policy`). Without it the
            noise and sampling still come from OS-seeded generators unless a seed is
            given (:func:`task.dp_training.train_local_dp`).

    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    epsilon_budget: float | None = None
    secure_mode: bool = False

    def __post_init__(self) -> None:
        _check(self.max_grad_norm > 0,
               f"max-grad-norm (the clip norm) must be positive, got {self.max_grad_norm}")
        _check((self.noise_multiplier is None) != (self.target_epsilon is None),
               "set exactly one of noise-multiplier and target-epsilon (got "
               f"noise-multiplier={self.noise_multiplier}, "
               f"target-epsilon={self.target_epsilon})")
        _check(self.noise_multiplier is None or self.noise_multiplier >= 0,
               f"noise-multiplier must not be negative, got {self.noise_multiplier}")
        _check(self.target_epsilon is None or self.target_epsilon > 0,
               f"target-epsilon must be positive, got {self.target_epsilon}")
        _check(0.0 < self.delta < 1.0, f"delta must be in (0, 1), got {self.delta}")
        _check_accountant(self.accountant)
        _check(self.epsilon_budget is None or self.epsilon_budget > 0,
               f"epsilon-budget must be positive, got {self.epsilon_budget}")

    def check_delta(self, num_examples: int) -> None:
        """Refuse a delta that is not below 1/n for a partition of ``num_examples``.

        Raises:
            ValueError: ``num_examples`` is not positive, or delta >= 1/n (a mechanism
                could then publish a whole example and still claim (epsilon, delta)-DP).

        """
        _check(num_examples > 0,
               f"cannot account privacy for a partition of {num_examples} examples")
        bound = 1.0 / num_examples
        _check(self.delta < bound,
               f"delta {self.delta:g} must be below 1/n = {bound:.3g} for a partition of "
               f"n = {num_examples} examples; lower delta (e.g. to {0.1 * bound:.1g})")


def _entry(noise_multiplier: float, sample_rate: float, steps: int) -> tuple[float, float, int]:
    _check(noise_multiplier >= 0, f"noise multiplier must not be negative, got {noise_multiplier}")
    _check(0.0 < sample_rate <= 1.0, f"sample rate must be in (0, 1], got {sample_rate}")
    _check(int(steps) == steps and steps >= 0,
           f"steps must be a whole number >= 0, got {steps}")
    return float(noise_multiplier), float(sample_rate), int(steps)


def _epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' epsilon for this history (0 when empty, inf when a step had no noise)."""
    _check(0.0 < delta < 1.0, f"delta must be in (0, 1), got {delta}")
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(noise == 0 for noise, _, _ in history):
        return math.inf  # a step without noise releases its gradient as it is
    instance = ACCOUNTANTS[accountant]()
    instance.history = list(history)
    return float(instance.get_epsilon(delta=delta))


class PrivacyLedger:
    """The privacy spent on one partition over a whole run, as Opacus' accountant history.

    Every DP round is recorded as ``(noise_multiplier, sample_rate, steps)``; epsilon is
    the composition over all of them, computed by Opacus' ``rdp`` or ``prv`` accountant.
    """

    def __init__(self, accountant: str = "rdp") -> None:
        """Start an empty ledger for Opacus' ``rdp`` or ``prv`` accountant."""
        _check_accountant(accountant)
        self._accountant = accountant
        self._history: list[tuple[float, float, int]] = []

    @property
    def accountant(self) -> str:
        """The name of the accountant (``rdp`` or ``prv``)."""
        return self._accountant

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """A copy of the recorded ``(noise_multiplier, sample_rate, steps)`` entries."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Noisy optimizer steps recorded so far."""
        return sum(steps for _, _, steps in self._history)

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` DP-SGD steps at this noise and sampling rate.

        Consecutive entries with the same noise and rate are merged, as Opacus'
        accountants do step by step.
        """
        entry = _entry(noise_multiplier, sample_rate, steps)
        if entry[2] == 0:
            return
        if self._history and self._history[-1][:2] == entry[:2]:
            noise, rate, done = self._history.pop()
            entry = (noise, rate, done + entry[2])
        self._history.append(entry)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any step, inf after a noiseless one)."""
        return _epsilon(self._accountant, self._history, delta)

    def epsilon_after(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
    ) -> float:
        """Epsilon after a planned round at ``delta``, without recording that round."""
        planned = _entry(noise_multiplier, sample_rate, steps)
        return _epsilon(self._accountant, [*self._history, planned], delta)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: ``{"accountant": name, "history": [[noise, rate, steps], ...]}``."""
        return {"accountant": self._accountant,
                "history": [[noise, rate, steps] for noise, rate, steps in self._history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (for the same accountant).

        Raises:
            ValueError: the state is malformed or was written by another accountant.

        """
        if not isinstance(state, Mapping) or not {"accountant", "history"} <= state.keys():
            raise ValueError("a privacy ledger state needs the keys 'accountant' and 'history'")
        if state["accountant"] != self._accountant:
            raise ValueError(f"cannot load a ledger of accountant '{state['accountant']}' into "
                             f"one of accountant '{self._accountant}'")
        history = []
        for item in state["history"]:
            if not isinstance(item, list | tuple) or len(item) != 3:
                raise ValueError(f"ledger entries are [noise, sample_rate, steps], got {item!r}")
            history.append(_entry(*item))
        self._history = history

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """A ledger restored from :meth:`state_dict` (its accountant taken from the state)."""
        accountant = state.get("accountant") if isinstance(state, Mapping) else None
        ledger = cls(str(accountant))
        ledger.load_state_dict(state)
        return ledger


def noise_for_target(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier (to Opacus' 0.01 epsilon tolerance) reaching a target.

    Found by Opacus' ``get_noise_multiplier`` for ``steps`` steps at ``sample_rate``
    starting from zero spent; the epsilon of the result is at most ``target_epsilon``.

    Raises:
        ValueError: a bad argument, or the target cannot be reached (Opacus gives up past a
            noise multiplier of 1e6).

    """
    _check(target_epsilon > 0, f"target epsilon must be positive, got {target_epsilon}")
    _check(0.0 < delta < 1.0, f"delta must be in (0, 1), got {delta}")
    _check(0.0 < sample_rate <= 1.0, f"sample rate must be in (0, 1], got {sample_rate}")
    _check(int(steps) == steps and steps >= 1, f"steps must be a whole number >= 1, got {steps}")
    _check_accountant(accountant)
    try:
        with warnings.catch_warnings():
            # the RDP search probes huge noise levels whose optimal order is the smallest one
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=int(steps), accountant=accountant))
    except ValueError as exc:
        if "budget is too low" not in str(exc):
            raise
        raise ValueError(
            f"target epsilon {target_epsilon:g} (delta {delta:g}) cannot be reached in "
            f"{int(steps)} steps at sample rate {sample_rate:.4g}, even with a noise "
            "multiplier of 1e6; plan fewer steps (local-steps, rounds), a smaller sample "
            "rate (batch-size), or a larger target epsilon"
        ) from exc
