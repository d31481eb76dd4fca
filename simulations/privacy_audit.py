"""The empirical privacy audit of a finished run's global adapter.

Two attacks on the final global adapter, which is what leaves the federation:

- **Canaries** (run with ``audit-canaries`` > 0): random-word examples with random
  labels, each put into some client's training data with probability 1/2. A
  loss-threshold attack scores every canary; its AUC (included vs left out) and the
  one-run epsilon lower bound of Steinke, Nasr and Jagielski (2023) follow
  (:func:`privacy.audit.audit_canaries`).
- **Real data**: the same attack on real training examples against held-out ones.

The epsilon lower bound is a statement about the whole training procedure (all clients,
all rounds) and the canaries' inclusion: DP-SGD with per-client epsilon ``e`` must give
a bound below ``e`` (up to the confidence level), and a leaking run can exceed it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

AUDIT_FILE = "audit.json"
REAL_EXAMPLES = 400  # members and non-members each, for the real-data attack


def audit_run(run_dir: str | Path, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Audit the run in ``run_dir`` (made with ``run_config``); writes ``audit.json``.

    Raises:
        ValueError: the run left no saved global adapter.

    """
    from privacy.audit import audit_canaries, loss_threshold_attack
    from server.state import StateStore
    from strategies.adapter import LoraAdapter
    from task.canaries import canary_dataset
    from task.run_settings import RunSettings
    from task.runtime import cached_runtime
    from task.training import per_example_losses

    run_dir = Path(run_dir)
    settings = RunSettings.from_run_config(dict(run_config))
    state = StateStore(run_dir).load_latest()
    if state is None:
        raise ValueError(f"{run_dir} has no saved global adapter to audit (state/ is empty)")
    runtime = cached_runtime(settings.task)
    runtime.activate()
    runtime.set_adapter(LoraAdapter.from_state_dict(state.arrays, settings.task.lora.lora_alpha))

    def losses(dataset: Any) -> np.ndarray:
        return per_example_losses(runtime.model, runtime.tokenizer, runtime.encode(dataset),
                                  batch_size=settings.federation.eval_batch(runtime.device),
                                  device=runtime.device, autocast=runtime.autocast)

    report: dict[str, Any] = {"round": state.round, "delta": settings.task.privacy.dp_delta}
    if settings.task.data.audit_canaries > 0:
        canaries, included = runtime.audit_canaries()
        canary_losses = losses(canary_dataset(canaries, like=runtime.data.train))
        attack = loss_threshold_attack(canary_losses[included], canary_losses[~included])
        audit = audit_canaries(-canary_losses, included, delta=settings.task.privacy.dp_delta)
        report["canaries"] = {"attack": attack.as_dict(), "one_run": audit.as_dict()}
    rng = np.random.default_rng(settings.task.data.seed)
    train, test = runtime.data.train, runtime.data.test
    members = rng.choice(len(train), size=min(REAL_EXAMPLES, len(train)), replace=False)
    others = rng.choice(len(test), size=min(REAL_EXAMPLES, len(test)), replace=False)
    real = loss_threshold_attack(losses(train.select(sorted(members))),
                                 losses(test.select(sorted(others))))
    report["real_data"] = {"attack": real.as_dict()}
    report["client_epsilon"] = client_epsilons(run_dir)
    (run_dir / AUDIT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def client_epsilons(run_dir: Path) -> dict[str, float]:
    """Each client's last reported cumulative epsilon (example-level DP-SGD), by node."""
    try:
        details = json.loads((run_dir / "details.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    latest: dict[str, float] = {}
    for server_round in sorted(details, key=int):
        latest.update(details[server_round].get("client_epsilon", {}))
    return latest


def load_audit(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``audit.json``, or None when it has none."""
    try:
        return json.loads((Path(run_dir) / AUDIT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
