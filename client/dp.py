"""Example-level DP-SGD on the client, and the privacy ledger that outlives a run.

The ledger holds the accountant's history for this node's data, so the epsilon it
reports each round is cumulative; it is written only when a round completes, before the
reply leaves. Flower keeps ``context.state`` for one run only, so by default (node
config ``dp-ledger=file``) the ledger is also kept on disk, written atomically with
mode 0600: in ``dp-ledger-file`` when the node names one, else in
``<state dir>/dp-ledgers/<hash>.json`` (:func:`ledger_path`). A node's epsilon then
keeps counting across a server restart (a resumed run is a new Flower run) and across
later runs on the same data, and its ``dp-max-epsilon`` caps the total. Simulations set
``dp-ledger=run``: the ledger lives in the run's state only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context

from client.policy import PolicyRefused

if TYPE_CHECKING:
    from client.policy import DPTerms, NodePolicy
    from privacy.accounting import PrivacyLedger
    from task.dp_training import DPTrainResult
    from task.runtime import TaskRuntime
    from task.settings import TrainSettings
    from task.training import Encoded

LEDGER_KEY = "fedlora.dp-ledger"
LEDGER_FILE_KEY = "dp-ledger-file"
LEDGER_DIR = "dp-ledgers"
#: the built-in datasets, named by the run config rather than by a path
BUILTIN_DATASETS = ("bbc-news",)


class BudgetRefused(PolicyRefused):
    """The client will not train a round that would exceed its privacy budget."""


def data_identity(*, dataset: str, partition_id: int, num_partitions: int) -> dict[str, Any]:
    """What identifies the data a node trains on, for naming its ledger.

    A local dataset is named by its resolved path (so ``./d.csv``, ``d.csv`` and a
    symlink to it are the same data); anything else by its name. The run's other data
    settings (partitioner, seeds, columns) are left out on purpose: they choose among the
    same examples, and a server that changes them must not get a fresh ledger.
    """
    path = Path(dataset).expanduser()
    if dataset in BUILTIN_DATASETS or not path.exists():
        name = dataset
    else:
        name = "file:" + str(path.resolve())
    return {"dataset": name, "partition-id": partition_id, "num-partitions": num_partitions}


def ledger_path(
    policy: NodePolicy, *, dataset: str, partition_id: int, num_partitions: int,
) -> Path | None:
    """Where the node keeps its ledger on disk (None with ``dp-ledger=run``).

    ``dp-ledger-file`` when the node config names one, else
    ``<state dir>/dp-ledgers/<hash>.json`` with the hash of :func:`data_identity` (the
    state dir: ``$FEDLORA_STATE_DIR``, else ``$XDG_STATE_HOME/fedlora``, else
    ``~/.local/state/fedlora``).
    """
    if policy.dp_ledger == "run":
        return None
    if policy.dp_ledger_file:
        return Path(policy.dp_ledger_file).expanduser()
    from privacy.files import state_dir

    identity = data_identity(dataset=dataset, partition_id=partition_id,
                             num_partitions=num_partitions)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return state_dir() / LEDGER_DIR / f"{digest[:32]}.json"


def load_ledger(context: Context, accountant: str, *, path: Path | None) -> PrivacyLedger:
    """The node's ledger from earlier rounds (a new one if there is none).

    With a ledger file, the longer of the file's history and the run state's is used
    (the file outlives the run, the state does not). A history kept under another
    accountant is carried over as it is: its entries (noise, sample rate, steps) describe
    the mechanism, and any accountant composes them.

    Raises:
        ValueError: the ledger file exists but cannot be read (never silently reset).

    """
    from privacy.accounting import PrivacyLedger

    ledgers = []
    record = context.state.config_records.get(LEDGER_KEY)
    if record is not None:
        ledgers.append(PrivacyLedger.from_state_dict(json.loads(str(record["ledger"]))))
    if path is not None and path.exists():
        try:
            ledgers.append(PrivacyLedger.from_state_dict(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the DP ledger file {path} cannot be read ({exc}); restore it "
                             "from a backup, or remove it only if this node's data has "
                             "never been trained on") from exc
    longest = max(ledgers, key=lambda ledger: ledger.steps, default=None)
    if longest is not None and longest.accountant == accountant:
        return longest
    ledger = PrivacyLedger(accountant)
    for noise, rate, steps in longest.history if longest is not None else []:
        ledger.record(noise_multiplier=noise, sample_rate=rate, steps=steps)
    return ledger


def store_ledger(
    context: Context, ledger: PrivacyLedger, *, path: Path | None,
    identity: dict[str, Any] | None = None,
) -> None:
    """Keep the ledger for the next round, and in ``path`` (atomically, 0600) if given.

    ``identity`` (the data the ledger is for) is written into the file for its readers.
    """
    state = ledger.state_dict()
    context.state[LEDGER_KEY] = ConfigRecord({"ledger": json.dumps(state)})
    if path is not None:
        from privacy.files import write_atomic

        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = json.dumps({**({"data": identity} if identity else {}), **state}, indent=1)
        write_atomic(path, text.encode(), 0o600)


def train_private(
    runtime: TaskRuntime, data: Encoded, settings: TrainSettings, *, terms: DPTerms,
    policy: NodePolicy, context: Context, ledger_file: Path | None, seed: int | None,
    num_rounds: int, penalty: Any = None, identity: dict[str, Any] | None = None,
) -> DPTrainResult:
    """One DP-SGD round on the active adapter, on the node's terms; the ledger is updated.

    A target epsilon is spread over ``num_rounds`` rounds of this round's steps. ``seed``
    None draws the noise and sampling from OS entropy (the default: the server cannot
    regenerate them); a number makes them reproducible (``dp-reproducible``).

    Raises:
        PolicyRefused: the round's noise is below the node's ``dp-min-noise-multiplier``,
            or the node asks for secure mode without ``torchcsprng``.
        BudgetRefused: the round would take epsilon past the budget (nothing was trained).

    """
    from task.dp_training import (
        PrivacyBudgetExceeded,
        SecureModeUnavailable,
        check_secure_mode,
        plan_round,
        planned_steps,
        train_local_dp,
    )

    if penalty is not None:
        raise ValueError("DP-SGD cannot add a training penalty (HetLoRA's self-pruning "
                         "regulariser); set hetlora-lambda=0 with dp=true")
    dp = terms.dp
    try:
        check_secure_mode(dp)
    except SecureModeUnavailable as exc:
        raise PolicyRefused(f"{exc} (node config dp-secure-mode=true)") from None
    dp.check_delta(len(data))
    target_steps = num_rounds * planned_steps(len(data), settings)
    plan = plan_round(len(data), settings, dp=dp, target_steps=target_steps)
    policy.check_noise(plan.noise_multiplier, derived=dp.target_epsilon is not None)
    ledger = load_ledger(context, dp.accountant, path=ledger_file)
    try:
        result = train_local_dp(
            runtime.model, runtime.tokenizer, data, settings, dp=dp, ledger=ledger,
            device=runtime.device, seed=seed, autocast=runtime.autocast,
            target_steps=target_steps)
    except PrivacyBudgetExceeded as exc:
        raise BudgetRefused(f"{exc} (the budget: {terms.budget_source})") from None
    store_ledger(context, ledger, path=ledger_file, identity=identity)
    return result
