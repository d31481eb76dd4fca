"""Example-level DP-SGD on the client: the privacy ledger in Flower's ``context.state``.

The ledger holds the accountant's history for this client across the whole run, so the
epsilon it reports each round is cumulative; it is written only when a round completes.
Flower keeps ``context.state`` for one run: a node started with the node config
``dp-ledger-file=<path>`` also keeps its ledger in that file (written atomically, 0600),
so its epsilon keeps counting across a server restart (a resumed run is a new Flower
run) and across runs on the same data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context

if TYPE_CHECKING:
    from privacy.accounting import DPSettings, PrivacyLedger
    from task.dp_training import DPTrainResult
    from task.runtime import TaskRuntime
    from task.settings import TrainSettings
    from task.training import Encoded

LEDGER_KEY = "fedlora.dp-ledger"
LEDGER_FILE_KEY = "dp-ledger-file"


class BudgetRefused(RuntimeError):
    """The client will not train a round that would exceed its privacy budget."""


def load_ledger(context: Context, accountant: str) -> PrivacyLedger:
    """The client's ledger from earlier rounds (a new one on the first round).

    With ``dp-ledger-file`` in the node config, the longer of the file's history and
    the run state's is used (the file survives the run, the state does not).

    Raises:
        ValueError: the ledger file exists but cannot be read (never silently reset).

    """
    from privacy.accounting import PrivacyLedger

    ledgers = []
    record = context.state.config_records.get(LEDGER_KEY)
    if record is not None:
        ledgers.append(PrivacyLedger.from_state_dict(json.loads(str(record["ledger"]))))
    path = _ledger_file(context)
    if path is not None and path.exists():
        try:
            ledgers.append(PrivacyLedger.from_state_dict(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the DP ledger file {path} cannot be read ({exc}); restore it "
                             "from a backup, or remove it only if this node's data has "
                             "never been trained on") from exc
    if not ledgers:
        return PrivacyLedger(accountant)
    return max(ledgers, key=lambda ledger: ledger.steps)


def store_ledger(context: Context, ledger: PrivacyLedger) -> None:
    """Keep the ledger for the next round (JSON: ConfigRecords hold no nested lists)."""
    text = json.dumps(ledger.state_dict())
    context.state[LEDGER_KEY] = ConfigRecord({"ledger": text})
    path = _ledger_file(context)
    if path is not None:
        from privacy.files import write_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode(), 0o600)


def _ledger_file(context: Context) -> Path | None:
    value = context.node_config.get(LEDGER_FILE_KEY)
    return Path(str(value)).expanduser() if value else None


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
