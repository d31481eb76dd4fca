"""The ``privacy`` experiment: its sweep, its hooks, and its report (fake runs, no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import simulations.experiments.privacy as privacy_module
from simulations.experiment import run_experiment
from simulations.experiments import get_experiment
from simulations.report import write_report

ACCURACY = {"fedit-epsinf": 0.95, "fedit-eps8": 0.85, "fedit-eps3": 0.75, "fedit-eps1": 0.5,
            "ffa-lora-epsinf": 0.94, "ffa-lora-eps8": 0.88, "ffa-lora-eps3": 0.8,
            "ffa-lora-eps1": 0.6, "overfit-control": 0.9}


def fake_simulate(config: dict[str, Any], **_: Any) -> list[dict[str, Any]]:
    """Writes what a run and its audit leave behind; accuracy by variant, +0.01 per seed."""
    out = Path(str(config["results-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    variant = out.name.rsplit("-seed", 1)[0]
    seed = int(config["seed"])
    accuracy = ACCURACY[variant] + 0.01 * seed
    records = [{"round": 0, "eval_accuracy": 0.2},
               {"round": int(config["num-rounds"]), "eval_accuracy": accuracy}]
    (out / "metrics.json").write_text(json.dumps(records))
    target = float(config.get("dp-target-epsilon", math.inf)) if config.get("dp") else math.inf
    epsilons = {} if math.isinf(target) else {"1": target * 0.9, "2": target}
    leaky = variant == "overfit-control"
    (out / "audit.json").write_text(json.dumps({
        "client_epsilon": epsilons,
        "canaries": {"attack": {"auc": 0.97 if leaky else 0.5 + 0.01 * seed},
                     "one_run": {"epsilon_lower_bound": 1.5 if leaky else 0.0}},
        "real_data": {"attack": {"auc": 0.6 if leaky else 0.51}},
    }))
    return records


def test_the_sweep_covers_every_epsilon_and_strategy_with_three_seeds() -> None:
    spec = get_experiment("privacy")
    names = [v.name for v in spec.variants]
    assert names == [f"{s}-eps{e}" for s in ("fedit", "ffa-lora") for e in ("inf", "8", "3", "1")
                     ] + ["overfit-control"]
    assert spec.seeds == (0, 1, 2) and spec.hooks == privacy_module.__name__
    assert spec.base_config["audit-canaries"] > 0 and spec.base_config["dp-delta"] == 1e-5
    eps8 = spec.variant_config(spec.variants[1])
    assert eps8["dp"] is True and eps8["dp-target-epsilon"] == 8.0
    assert spec.variant_config(spec.variants[0])["dp"] is False
    assert spec.variant_config(spec.variants[0])["learning-rate"] == 0.002
    assert spec.hook("simulate") is privacy_module.simulate
    assert spec.variant_config(spec.variants[-1])["dp"] is False


def test_report_has_the_privacy_table_and_plot(tmp_path: Path) -> None:
    spec = get_experiment("privacy")
    result = run_experiment(spec, seeds=[0, 1, 2], results_dir=tmp_path,
                            simulate_fn=fake_simulate)
    report = write_report(result, command="fedlora experiment privacy").read_text()
    assert "## Privacy and audit" in report
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| `")
            and "Privacy" not in line}
    # accuracy mean ± std over seeds 0, 1, 2: +0, +0.01, +0.02
    assert rows["fedit-eps8"][1] == "0.860 ± 0.010"
    assert rows["fedit-eps8"][0] == "8" and rows["fedit-epsinf"][0] == "inf"
    assert rows["fedit-eps8"][2] == "8.000 ± 0.000" and rows["fedit-eps8"][3] == "7.20 – 8.00"
    assert rows["fedit-epsinf"][2] == "—"
    assert rows["overfit-control"][4] == "0.970"  # the control runs with the first seed
    assert rows["overfit-control"][6] == "1.500"
    assert rows["overfit-control"][7] == "1/1"
    assert rows["ffa-lora-eps1"][7] == "3/3"
    assert (tmp_path / privacy_module.PRIVACY_PLOT).stat().st_size > 0
    assert f"]({privacy_module.PRIVACY_PLOT})" in report
