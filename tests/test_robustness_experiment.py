"""The ``robustness`` experiment: its sweep parses, its report, and a tiny real run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import simulations.experiments.robustness as robustness_module
from simulations.attacks import Attack
from simulations.experiment import run_experiment
from simulations.experiments import get_experiment
from simulations.report import write_report
from task.run_settings import RunSettings
from tests.conftest import tiny_run_config

HONEST = {"1 of 4": 0.90, "2 of 8": 0.92}
COST = {"scaled-off": 0.60, "scaled-bound": 0.02, "sign-flip-bound": 0.03,
        "noise-bound": 0.01, "label-flip-bound": 0.07, "silent-bound": 0.02,
        "label-flip-trimmed-mean": 0.08}


def fake_simulate(config: dict[str, Any], **_: Any) -> list[dict[str, Any]]:
    """Writes a run's metrics: the honest accuracy minus the arm's cost, -0.01 per seed."""
    out = Path(str(config["results-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    arm = out.name.rsplit("-seed", 1)[0].split("-", 1)[1]
    seed = int(config["seed"])
    accuracy = HONEST[str(config["federation"])] - COST.get(arm, 0.0) - 0.01 * seed
    rejected = 1 if arm == "scaled-bound" else 0
    records = [{"round": 0, "eval_accuracy": 0.2},
               *({"round": r, "eval_accuracy": accuracy, "num_rejected": rejected}
                 for r in range(1, int(config["num-rounds"]) + 1))]
    (out / "metrics.json").write_text(json.dumps(records))
    return records


def test_the_sweep_covers_every_attack_and_defence_and_every_run_parses(tmp_path):
    spec = get_experiment("robustness")
    names = [v.name for v in spec.variants]
    assert len(names) == 28 and len(set(names)) == 28
    for federation, robust in (("1of4", "median"), ("2of8", "trimmed-mean")):
        for arm in ("honest-bound", "silent-bound", "scaled-off", "scaled-bound",
                    "sign-flip-bound", "noise-bound", "label-flip-bound", f"honest-{robust}",
                    f"sign-flip-{robust}", f"noise-{robust}", f"label-flip-{robust}",
                    "sign-flip-norm-only", "noise-norm-only", "label-flip-norm-only"):
            assert f"{federation}-{arm}" in names
    assert spec.hooks == robustness_module.__name__ and spec.group_by == "federation"
    assert spec.hook("simulate") is robustness_module.simulate
    for variant in spec.variants:
        config = spec.run_config(variant, 0, tmp_path)
        settings = RunSettings.from_run_config(spec.settings_config(variant, 0, tmp_path))
        attack, _ = Attack.from_run_config(config)
        clients = int(config["num-clients"])
        assert config["min-available-nodes"] == clients
        assert len(attack.attackers) == clients // 4 and max(attack.attackers) < clients
        fed = settings.robust
        if config["defence"] == "off":
            assert (fed.aggregator, fed.update_norm_bound, fed.update_min_cosine) == (
                "mean", 0.0, -1.0)
        else:
            assert fed.update_norm_bound == 10.0  # every other arm keeps the default bound
            assert fed.update_min_cosine == (-1.0 if config["defence"] == "norm-only" else 0.0)
            assert fed.aggregator == {"bound": "mean", "norm-only": "mean"}.get(
                str(config["defence"]), config["defence"])


def test_report_has_the_attack_table_with_costs_against_the_honest_run(tmp_path):
    spec = get_experiment("robustness")
    result = run_experiment(spec, seeds=[0, 1], results_dir=tmp_path,
                            simulate_fn=fake_simulate)
    report = write_report(result, command="fedlora experiment robustness").read_text()
    assert "## Attacks and defences" in report and "### federation = 1 of 4" in report
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): [c.strip() for c in
                                                              line.split("|")[4:-1]]
            for line in report.splitlines() if line.startswith("| 1 of 4 |")
            or line.startswith("| 2 of 8 |")}
    # scaled-off: 0.90 - 0.60 = 0.30 (seed 0), 0.29 (seed 1); the honest clients alone
    # (silent) 0.88 and 0.87: 58 points below them, 60 below nobody attacking
    assert rows[("1 of 4", "scaled", "off")] == [
        "0.295 ± 0.007", "+58.0 ± 0.0", "+60.0 ± 0.0", "0", "**no**"]
    assert rows[("1 of 4", "scaled", "bound")] == [
        "0.875 ± 0.007", "+0.0 ± 0.0", "+2.0 ± 0.0", "3", "yes"]
    assert rows[("2 of 8", "label-flip", "bound")][1:] == [
        "+5.0 ± 0.0", "+7.0 ± 0.0", "0", "yes"]
    assert rows[("2 of 8", "sign-flip", "bound")][1:3] == ["+1.0 ± 0.0", "+3.0 ± 0.0"]
    assert rows[("2 of 8", "honest", "bound")][1:] == [
        "-2.0 ± 0.0", "+0.0 ± 0.0", "0", "—"]
    assert rows[("1 of 4", "silent", "bound")][4] == "—"
    assert rows[("2 of 8", "label-flip", "trimmed-mean")][1:] == [
        "+6.0 ± 0.0", "+8.0 ± 0.0", "0", "**no**"]


@pytest.mark.e2e
def test_two_arms_run_for_real_at_tiny_scale(tiny_bert_dir, toy_csv, tmp_path):
    """The hook runs attacked simulations through Ray: honest and scaled (rejected)."""
    spec = get_experiment("robustness")
    tiny = tiny_run_config(tiny_bert_dir, toy_csv, **{"num-rounds": 1, "eval-subset": 0})
    spec = spec.with_overrides(tiny)
    wanted = {"1of4-honest-bound", "1of4-scaled-bound"}
    spec = type(spec)(**{**spec.__dict__,
                         "variants": [v for v in spec.variants if v.name in wanted]})
    result = run_experiment(spec, seeds=[0], results_dir=tmp_path,
                            simulate_options={"gpus_per_client": 0.0})
    assert not result.failed_runs
    records = {r.variant: r.records for r in result.runs}
    assert records["1of4-honest-bound"][1]["num_accepted"] == 4
    assert (records["1of4-scaled-bound"][1]["num_accepted"],
            records["1of4-scaled-bound"][1]["num_rejected"]) == (3, 1)
    report = write_report(result).read_text()
    assert "| 1 of 4 | scaled | bound |" in report
