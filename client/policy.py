"""A node's own policy: what the server may ask of it, and on what DP terms it trains.

The server's run config and each round's instructions say what to train and how; a
node need not accept all of it. Its policy is parsed once per message from its node
config (``flower-supernode --node-config "dp-required=true dp-max-epsilon=8"``; in
simulations :func:`simulations.simulate.simulate` sets it for every virtual node). A
request outside the policy is refused: the node replies with an error that names the
node-config key, the value asked for and the fix, and trains nothing. It never trains
silently on other terms than the ones asked for, except for ``max-lora-rank``, which
lowers the rank (a smaller adapter of the same scale is still a faithful answer).

| node-config key | default | meaning |
|---|---|---|
| ``max-lora-rank`` | none | lower the rank to this (alpha in proportion: same scale) |
| ``max-lora-alpha`` | none | refuse an alpha (after ``max-lora-rank``) above this |
| ``max-num-rounds`` | none | refuse a run whose ``num-rounds`` is above this (1) |
| ``dp-required`` | false | refuse to train without DP-SGD (``dp=false``) |
| ``dp-min-noise-multiplier`` | 0 (none) | refuse a round with less noise than this (2) |
| ``dp-max-epsilon`` | 10 | the node's cap on its cumulative epsilon (3); ``inf``: none |
| ``dp-default-budget`` | ``dp-max-epsilon`` | the budget when the run sets none (4) |
| ``dp-max-delta`` | 0 (none) | refuse a ``dp-delta`` above this (5) |
| ``dp-secure-mode`` | false | Opacus' secure RNG for noise and sampling (6) |
| ``dp-allow-reproducible`` | false | accept ``dp-reproducible=true`` (7) |
| ``dp-ledger`` | ``file`` | ``file``: ledger on disk too; ``run``: in the run's state only (8) |
| ``dp-ledger-file`` | (state dir) | the ledger's file (9) |

(1) A round past the run's ``num-rounds`` is always refused: the DP noise of a
``dp-target-epsilon`` is planned for that many rounds.
(2) The run's ``dp-noise-multiplier``, or the one derived from its ``dp-target-epsilon``.
(3) At the run's ``dp-delta``, over every DP round this node trained on the same data
(the ledger), whatever the server says: a round that would pass it is refused, and so
is a run whose ``dp-target-epsilon`` or ``dp-epsilon-budget`` is above it.
(4) Used when the run has ``dp-epsilon-budget=0``; at most ``dp-max-epsilon``. A run's
own budget (below the cap) takes its place.
(5) A delta of 1/n of the node's partition or more is refused whatever this says.
(6) Needs the ``torchcsprng`` package; refused without it, never a silent fallback.
(7) Noise and sampling seeded from the run seed, which the server knows: it could
regenerate and remove the noise. Refused unless the node allows it (experiments).
(8) ``run`` keeps the ledger in Flower's ``context.state``, which a new run starts
empty; simulations use it so repeated research runs do not accumulate.
(9) Default ``<state dir>/dp-ledgers/<hash>.json``, the hash of the dataset (a local
path resolved) and the partition; see :func:`client.dp.ledger_path`.

Why a default cap of epsilon 10: with it, a node that declares nothing is still
protected against a server that asks for no budget (or a huge one) and a tiny noise
multiplier. Epsilon 10 is the top of the range commonly reported for DP training of
large models (e.g. Ponomareva et al. 2023, "How to DP-fy ML", class it as the upper end
of "reasonable"); beyond it the formal guarantee says little. The cap counts across
runs on the same data (the on-disk ledger), so a node that has spent it trains no more
on that data until its operator raises ``dp-max-epsilon`` knowingly.

Why ``max-lora-alpha`` refuses instead of lowering: the server reads the returned
factors at scale alpha/rank; lowering alpha alone would change that scale, and the
server would aggregate an update trained at another scale than it assumes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from client.ranks import BUDGET_KEY, lower_rank
from strategies.instructions import ClientInstructions
from task.tasks.base import DATA_WARNINGS_KEY

if TYPE_CHECKING:
    from privacy.accounting import DPSettings

DEFAULT_MAX_EPSILON = 10.0
LEDGER_MODES = ("file", "run")

#: what every simulated node adds to its node config (``fedlora simulate``, experiments):
#: the experimenter runs the server and every node, so there is no other party to hold a
#: node's terms against. A research run's ledger starts empty and ends with the run,
#: reproducible noise may be asked for, and there is no node cap (any epsilon can be
#: studied); the run's own ``dp-epsilon-budget`` still applies.
SIMULATION_NODE_CONFIG: dict[str, str | bool | float] = {
    "dp-ledger": "run", "dp-allow-reproducible": True, "dp-max-epsilon": math.inf,
    DATA_WARNINGS_KEY: False}

#: every ``dp-`` key this module reads (a misspelt one is an error, not a silent no-op)
DP_KEYS = frozenset({
    "dp-required", "dp-min-noise-multiplier", "dp-max-epsilon", "dp-default-budget",
    "dp-max-delta", "dp-secure-mode", "dp-allow-reproducible", "dp-ledger", "dp-ledger-file",
})


class PolicyRefused(RuntimeError):
    """The server asked for something outside the node's policy; the node does not train."""


def _fix(key: str, example: object) -> str:
    return f'start the SuperNode with --node-config "{key}={example}"'


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"node config {key} must be true or false, got {value!r}; "
                     + _fix(key, "true"))


def _number(
    config: Mapping[str, Any], key: str, *, default: float | None, minimum: float,
    strict: bool = False, whole: bool = False, example: object = 1,
) -> float | None:
    """A number from the node config: above (``strict``) or at least ``minimum``."""
    if key not in config:
        return default
    value = config[key]
    try:
        number = float(value)
        if isinstance(value, bool) or math.isnan(number):
            raise ValueError
        if whole and not (math.isfinite(number) and number.is_integer()):
            raise ValueError
    except (TypeError, ValueError):
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"node config {key} must be {kind}, got {value!r}; "
                         + _fix(key, example)) from None
    if number < minimum or (strict and number == minimum):
        bound = f"above {minimum:g}" if strict else f"at least {minimum:g}"
        raise ValueError(f"node config {key} must be {bound}, got {value!r}; "
                         + _fix(key, example))
    return number


@dataclass(frozen=True)
class DPTerms:
    """The DP-SGD terms a node trains a round on.

    Attributes:
        dp: the server's DP settings with the node's budget (``epsilon_budget``: the
            tightest of the server's, the node's default and its cap) and secure mode.
        budget_source: which setting that budget is (for refusals).
        reproducible: noise and sampling seeded from the run seed (``dp-reproducible``).

    """

    dp: DPSettings
    budget_source: str
    reproducible: bool


@dataclass(frozen=True, kw_only=True)
class NodePolicy:
    """A node's bounds on instructions and its DP terms (see the module docstring)."""

    max_lora_rank: int | None = None
    max_lora_alpha: float | None = None
    max_num_rounds: int | None = None
    dp_required: bool = False
    dp_min_noise_multiplier: float = 0.0
    dp_max_epsilon: float = DEFAULT_MAX_EPSILON
    dp_default_budget: float = DEFAULT_MAX_EPSILON
    dp_max_delta: float | None = None
    dp_secure_mode: bool = False
    dp_allow_reproducible: bool = False
    dp_ledger: str = "file"
    dp_ledger_file: str = ""

    def __post_init__(self) -> None:
        if self.dp_default_budget > self.dp_max_epsilon:
            raise ValueError(
                f"node config dp-default-budget {self.dp_default_budget:g} is above "
                f"dp-max-epsilon {self.dp_max_epsilon:g}; lower dp-default-budget or raise "
                "dp-max-epsilon")
        if self.dp_ledger not in LEDGER_MODES:
            raise ValueError(f"node config dp-ledger must be one of {LEDGER_MODES}, got "
                             f"{self.dp_ledger!r}; " + _fix("dp-ledger", '"file"'))
        if self.dp_ledger == "run" and self.dp_ledger_file:
            raise ValueError("node config dp-ledger='run' keeps no file, but dp-ledger-file "
                             f"is {self.dp_ledger_file!r}; set one or the other")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """Parse the policy; a malformed or unknown ``dp-`` key is an error naming it.

        Raises:
            ValueError: a key with a bad value, or an unknown ``dp-`` key.

        """
        unknown = sorted(k for k in node_config if k.startswith("dp-") and k not in DP_KEYS)
        if unknown:
            raise ValueError(f"unknown DP node-config key(s) {unknown}; known: "
                             f"{', '.join(sorted(DP_KEYS))}")
        c = node_config
        rank = _number(c, BUDGET_KEY, default=None, minimum=1, whole=True, example=4)
        rounds = _number(c, "max-num-rounds", default=None, minimum=1, whole=True, example=10)
        cap = _number(c, "dp-max-epsilon", default=DEFAULT_MAX_EPSILON, minimum=0, strict=True,
                      example=8)
        assert cap is not None
        default_budget = _number(c, "dp-default-budget", default=cap, minimum=0, strict=True,
                                 example=cap)
        assert default_budget is not None
        max_delta = _number(c, "dp-max-delta", default=0.0, minimum=0, example=1e-5)
        min_noise = _number(c, "dp-min-noise-multiplier", default=0.0, minimum=0, example=0.8)
        return cls(
            max_lora_rank=None if rank is None else int(rank),
            max_lora_alpha=_number(c, "max-lora-alpha", default=None, minimum=0, strict=True,
                                   example=16),
            max_num_rounds=None if rounds is None else int(rounds),
            dp_required=_flag(c, "dp-required"),
            dp_min_noise_multiplier=float(min_noise or 0.0),
            dp_max_epsilon=cap,
            dp_default_budget=default_budget,
            dp_max_delta=max_delta or None,
            dp_secure_mode=_flag(c, "dp-secure-mode"),
            dp_allow_reproducible=_flag(c, "dp-allow-reproducible"),
            dp_ledger=str(c.get("dp-ledger", "file")),
            dp_ledger_file=str(c.get("dp-ledger-file", "") or ""),
        )

    def bound_instructions(self, instructions: ClientInstructions) -> ClientInstructions:
        """The instructions within the node's bounds: the rank lowered, the alpha checked.

        Raises:
            PolicyRefused: the alpha (after ``max-lora-rank``) is above ``max-lora-alpha``.

        """
        asked = instructions
        if self.max_lora_rank is not None:
            instructions = lower_rank(instructions, self.max_lora_rank)
        limit = self.max_lora_alpha
        if limit is not None and instructions.alpha > limit * (1 + 1e-9):
            lowered = (f" (lora-alpha {asked.alpha:g} at rank {asked.rank}, lowered with "
                       f"max-lora-rank {self.max_lora_rank})" if instructions is not asked
                       else "")
            raise PolicyRefused(
                f"the server asks for lora-alpha {instructions.alpha:g}{lowered}, above this "
                f"node's max-lora-alpha {limit:g}; lowering alpha would change the scale "
                "alpha/rank the server reads the factors at, so the node refuses. Fix: run "
                "with a lower lora-alpha, or raise max-lora-alpha in the node config")
        return instructions

    def check_rounds(self, *, num_rounds: int, server_round: int) -> None:
        """Refuse a run longer than ``max-num-rounds``, and a round past ``num-rounds``.

        Raises:
            PolicyRefused: either, with the values and the fix.

        """
        if self.max_num_rounds is not None and num_rounds > self.max_num_rounds:
            raise PolicyRefused(
                f"the run has num-rounds {num_rounds}, above this node's max-num-rounds "
                f"{self.max_num_rounds}; run with fewer rounds, or raise max-num-rounds in "
                "the node config")
        if server_round > num_rounds:
            raise PolicyRefused(
                f"round {server_round} is past the run's num-rounds {num_rounds} (the node "
                "plans its DP noise for num-rounds rounds); run with num-rounds >= "
                f"{server_round}")

    def dp_terms(self, dp: DPSettings | None, *, reproducible: bool) -> DPTerms | None:
        """The terms this node trains on, given the server's DP settings (None: no DP).

        The budget is the server's ``dp-epsilon-budget``, else the node's
        ``dp-default-budget``, and never above ``dp-max-epsilon``.

        Raises:
            PolicyRefused: no DP on a node that requires it; reproducible noise without
                ``dp-allow-reproducible``; a delta, target epsilon, budget or noise
                multiplier outside the node's bounds.

        """
        if dp is None:
            if self.dp_required:
                raise PolicyRefused(
                    "this node trains only with DP-SGD (node config dp-required=true), and "
                    "the run has dp=false; run with dp=true")
            return None
        if reproducible and not self.dp_allow_reproducible:
            raise PolicyRefused(
                "the run asks for dp-reproducible=true: DP noise seeded from the run seed, "
                "which the server knows, so it could regenerate and remove the noise. Fix: "
                "run with dp-reproducible=false, or (experiments only) set "
                "dp-allow-reproducible=true in the node config")
        if self.dp_max_delta is not None and dp.delta > self.dp_max_delta:
            raise PolicyRefused(
                f"the run has dp-delta {dp.delta:g}, above this node's dp-max-delta "
                f"{self.dp_max_delta:g}; run with a smaller dp-delta, or raise dp-max-delta")
        if dp.noise_multiplier is not None:
            self.check_noise(dp.noise_multiplier, derived=False)
        cap = self.dp_max_epsilon
        for key, value in (("dp-target-epsilon", dp.target_epsilon),
                           ("dp-epsilon-budget", dp.epsilon_budget)):
            if value is not None and value > cap:
                raise PolicyRefused(
                    f"the run has {key} {value:g}, above this node's dp-max-epsilon {cap:g}; "
                    f"run with {key} <= {cap:g}, or raise dp-max-epsilon in the node config")
        if dp.epsilon_budget is not None:
            budget, source = dp.epsilon_budget, f"the run's dp-epsilon-budget {dp.epsilon_budget:g}"
        elif self.dp_default_budget < cap:
            budget = self.dp_default_budget
            source = (f"the node's dp-default-budget {budget:g} (the run sets no "
                      "dp-epsilon-budget)")
        else:
            budget, source = cap, f"the node's dp-max-epsilon {cap:g}"
        terms = dataclasses.replace(dp, epsilon_budget=None if math.isinf(budget) else budget,
                                    secure_mode=dp.secure_mode or self.dp_secure_mode)
        return DPTerms(dp=terms, budget_source=source, reproducible=reproducible)

    def check_noise(self, noise_multiplier: float, *, derived: bool) -> None:
        """Refuse a noise multiplier below ``dp-min-noise-multiplier``.

        ``derived``: the noise was found for the run's ``dp-target-epsilon``.

        Raises:
            PolicyRefused: the noise is below the node's minimum.

        """
        if noise_multiplier < self.dp_min_noise_multiplier:
            origin = ("derived from the run's dp-target-epsilon" if derived
                      else "the run's dp-noise-multiplier")
            raise PolicyRefused(
                f"the round's noise multiplier {noise_multiplier:.4g} ({origin}) is below "
                f"this node's dp-min-noise-multiplier {self.dp_min_noise_multiplier:g}; run "
                "with more noise (a larger dp-noise-multiplier, or a smaller "
                "dp-target-epsilon), or lower dp-min-noise-multiplier")
