"""Example-level DP-SGD on the client: the privacy ledger in Flower's ``context.state``.

The ledger holds the accountant's history for this client across the whole run, so the
epsilon it reports each round is cumulative; it is written only when a round completes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context

if TYPE_CHECKING:
    from privacy.accounting import DPSettings, PrivacyLedger
    from task.dp_training import DPTrainResult
    from task.runtime import TaskRuntime
    from task.settings import TrainSettings
    from task.training import Encoded

LEDGER_KEY = "fedlora.dp-ledger"


class BudgetRefused(RuntimeError):
    """The client will not train a round that would exceed its privacy budget."""


def load_ledger(context: Context, accountant: str) -> PrivacyLedger:
    """The client's ledger from earlier rounds (a new one on the first round)."""
    from privacy.accounting import PrivacyLedger

    record = context.state.config_records.get(LEDGER_KEY)
    if record is None:
        return PrivacyLedger(accountant)
    return PrivacyLedger.from_state_dict(json.loads(str(record["ledger"])))


def store_ledger(context: Context, ledger: PrivacyLedger) -> None:
    """Keep the ledger for the next round (JSON: ConfigRecords hold no nested lists)."""
    context.state[LEDGER_KEY] = ConfigRecord({"ledger": json.dumps(ledger.state_dict())})


def train_private(
    runtime: TaskRuntime, data: Encoded, settings: TrainSettings, *, dp: DPSettings,
    context: Context, seed: int, num_rounds: int, penalty: Any = None,
) -> DPTrainResult:
    """One DP-SGD round on the active adapter; the ledger is updated and stored.

    A target epsilon is spread over ``num_rounds`` rounds of this round's steps.

    Raises:
        BudgetRefused: the round would take epsilon past the budget (nothing was trained).

    """
    from task.dp_training import PrivacyBudgetExceeded, planned_steps, train_local_dp

    if penalty is not None:
        raise ValueError("DP-SGD cannot add a training penalty (HetLoRA's self-pruning "
                         "regulariser); set hetlora-lambda=0 with dp=true")
    ledger = load_ledger(context, dp.accountant)
    try:
        result = train_local_dp(
            runtime.model, runtime.tokenizer, data, settings, dp=dp, ledger=ledger,
            device=runtime.device, seed=seed, autocast=runtime.autocast,
            target_steps=num_rounds * planned_steps(len(data), settings))
    except PrivacyBudgetExceeded as exc:
        raise BudgetRefused(str(exc)) from None
    store_ledger(context, ledger)
    return result
