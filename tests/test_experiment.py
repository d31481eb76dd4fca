"""The experiment runner, report and registry, with a fake simulation (no Flower, no Ray)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import simulations.experiment as experiment_module
import simulations.experiments as registry
from simulations.cli import main
from simulations.experiment import (
    ExperimentResult,
    ExperimentSpec,
    Variant,
    run_experiment,
)
from simulations.experiments import get_experiment, register_experiment
from simulations.report import plot_metric, write_report

# Held-out accuracy per round (rounds 0-3) of each (strategy, seed).
CURVES = {
    ("fedit", 0): [0.40, 0.60, 0.70, 0.80],
    ("fedit", 1): [0.40, 0.70, 0.90, 0.86],
    ("ffa-lora", 0): [0.40, 0.50, 0.60, 0.70],
    ("ffa-lora", 1): [0.40, 0.55, 0.65, 0.74],
}
BYTES_UP = {"fedit": 1_200_000, "ffa-lora": 600_000}


def fake_records(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Plausible per-round records; accuracy from CURVES, agg error 0 for FFA-LoRA."""
    strategy, seed = str(config["strategy"]), int(config["seed"])
    records = []
    for rnd, accuracy in enumerate(CURVES[strategy, seed][: int(config["num-rounds"]) + 1]):
        record: dict[str, Any] = {
            "round": rnd, "eval_accuracy": accuracy, "eval_loss": 1.0 - accuracy,
            "train_loss": None if rnd == 0 else 2.0 - accuracy,
            "bytes_up": 0 if rnd == 0 else BYTES_UP[strategy] + 1000 * rnd,
            "bytes_down": 0 if rnd == 0 else 2 * BYTES_UP[strategy], "seconds": 1.0,
        }
        if rnd > 0:
            record["agg_error_mean"] = 0.0 if strategy == "ffa-lora" else 0.1 * rnd * (1 + seed)
        records.append(record)
    return records


class FakeSimulate:
    """Stands in for ``simulate``: writes metrics.json/details.json, counts its calls."""

    def __init__(self, fail: set[tuple[str, int]] | None = None) -> None:
        self.calls: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.fail = fail or set()

    def __call__(self, config: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
        self.calls.append((dict(config), kwargs))
        if (config["strategy"], config["seed"]) in self.fail:
            raise RuntimeError("boom")
        out = Path(config["results-dir"])
        out.mkdir(parents=True, exist_ok=True)
        records = fake_records(config)
        (out / "metrics.json").write_text(json.dumps(records))
        details = {str(r["round"]): {"aggregation_error": {"query": r["agg_error_mean"]},
                                     "client_ranks": {"1": 8, "2": 8}}
                   for r in records if r["round"] > 0}
        (out / "details.json").write_text(json.dumps(details))
        return records


def make_spec(**changes: Any) -> ExperimentSpec:
    fields: dict[str, Any] = {
        "name": "toy", "description": "A toy sweep.\nSecond line.",
        "variants": [Variant("fedit", {"strategy": "fedit"}),
                     Variant("ffa-lora", {"strategy": "ffa-lora", "lora-rank": 4})],
        "num_clients": 3, "base_config": {"num-rounds": 3, "lora-rank": 8, "model": "tiny-bert"},
        "threshold": 0.85,
    }
    fields.update(changes)
    return ExperimentSpec(**fields)


def sweep(tmp_path: Path, fake: FakeSimulate | None = None, **kwargs: Any) -> ExperimentResult:
    spec = kwargs.pop("spec", None) or make_spec()
    return run_experiment(spec, seeds=[0, 1], results_dir=tmp_path / "exp",
                          simulate_fn=fake or FakeSimulate(), **kwargs)


def test_every_variant_runs_with_every_seed_in_its_own_folder(tmp_path):
    fake = FakeSimulate()
    sweep(tmp_path, fake)

    configs = [c for c, _ in fake.calls]
    assert [(c["strategy"], c["seed"]) for c in configs] == [
        ("fedit", 0), ("fedit", 1), ("ffa-lora", 0), ("ffa-lora", 1)]
    assert configs[3] == {
        "min-train-nodes": 2, "min-available-nodes": 3, "num-rounds": 3, "lora-rank": 4,
        "model": "tiny-bert", "strategy": "ffa-lora", "seed": 1,
        "results-dir": str(tmp_path / "exp" / "runs" / "ffa-lora-seed1")}
    assert configs[0]["lora-rank"] == 8
    assert all(kwargs == {"num_clients": 3} for _, kwargs in fake.calls)
    assert (tmp_path / "exp" / "runs" / "fedit-seed1" / "details.json").exists()


def test_summaries_match_hand_computed_values(tmp_path):
    result = sweep(tmp_path)

    fedit, ffa = result.summary("fedit"), result.summary("ffa-lora")
    assert fedit.final_accuracy.mean == pytest.approx(0.83)
    assert fedit.final_accuracy.std == pytest.approx(statistics.stdev([0.80, 0.86]))
    assert fedit.best_accuracy.mean == pytest.approx(0.85)
    assert fedit.best_accuracy.std == pytest.approx(statistics.stdev([0.80, 0.90]))
    assert fedit.final_eval_loss.mean == pytest.approx(0.17)
    # threshold 0.85: seed 1 reaches it in round 2, seed 0 never
    assert fedit.reached_threshold == 1 and fedit.rounds_to_threshold.mean == 2
    assert ffa.reached_threshold == 0 and ffa.rounds_to_threshold.mean is None
    # bytes_up in rounds 1-3: base + 1000 r, so the mean per round is base + 2000
    assert fedit.bytes_up_per_round.mean == pytest.approx(1_202_000)
    assert fedit.bytes_down_per_round.mean == pytest.approx(2_400_000)
    # agg error per round 0.1 r (1 + seed): mean over rounds 0.2 (seed 0) and 0.4 (seed 1)
    assert fedit.agg_error_mean.mean == pytest.approx(0.3)
    assert fedit.agg_error_mean.std == pytest.approx(statistics.stdev([0.2, 0.4]))
    assert ffa.agg_error_mean.mean == 0.0
    assert fedit.seconds.mean == pytest.approx(4.0)
    assert ffa.final_accuracy.mean == pytest.approx(0.72) and ffa.runs == 2 and ffa.failed == 0
    round2 = fedit.accuracy_curve[2]
    assert round2["round"] == 2 and round2["n"] == 2
    assert (round2["mean"], round2["min"], round2["max"]) == pytest.approx((0.8, 0.7, 0.9))


def test_results_json_holds_spec_seeds_runs_and_summaries(tmp_path):
    result = sweep(tmp_path)

    data = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert data["experiment"]["name"] == "toy" and data["seeds"] == [0, 1]
    assert data["experiment"]["variants"][1] == {
        "name": "ffa-lora", "run_config": {"strategy": "ffa-lora", "lora-rank": 4},
        "max_seeds": None}
    assert [(r["variant"], r["seed"], r["error"]) for r in data["runs"]] == [
        ("fedit", 0, None), ("fedit", 1, None), ("ffa-lora", 0, None), ("ffa-lora", 1, None)]
    assert data["runs"][1]["records"] == fake_records({"strategy": "fedit", "seed": 1,
                                                       "num-rounds": 3})
    summary = data["summaries"][0]
    assert summary["variant"] == "fedit"
    assert summary["final_accuracy"]["mean"] == pytest.approx(0.83)
    assert summary["reached_threshold"] == 1

    loaded = ExperimentResult.load(tmp_path / "exp")
    assert loaded.spec == result.spec and loaded.summaries == result.summaries


def test_report_has_the_table_settings_command_and_plots(tmp_path):
    result = sweep(tmp_path)
    command = "fedlora experiment toy --seeds 0,1"
    report = write_report(result, command=command)

    text = report.read_text()
    assert report == tmp_path / "exp" / "report.md"
    assert text.startswith("# Experiment `toy`\n\nA toy sweep.")
    assert f"```bash\n{command}\n```" in text
    assert "| `num-rounds` | `3` |" in text and "| `ffa-lora` | `strategy=ffa-lora lora-rank=4` |" \
        in text
    assert ("| `fedit` | 0.830 ± 0.042 | 0.850 ± 0.071 | 2.0 (1/2) | 1.20 MB | 2.40 MB "
            "| 3.00e-01 ± 1.41e-01 | 0.170 ± 0.042 | 2/2 |") in text
    assert "| `ffa-lora` | 0.720 ± 0.028 | 0.720 ± 0.028 | never (0/2) | 602.0 kB " in text
    assert "rounds to ≥ 0.85" in text
    assert "Failed runs" not in text
    for name in ("accuracy.png", "aggregation_error.png"):
        assert (tmp_path / "exp" / name).stat().st_size > 1000
        assert f"]({name})" in text


def test_group_by_gives_one_table_and_subplot_per_value(tmp_path):
    variants = [Variant(f"{s}-a{a}", {"strategy": s, "dirichlet-alpha": a})
                for a in (0.1, 1.0) for s in ("fedit", "ffa-lora")]
    result = sweep(tmp_path, spec=make_spec(variants=variants, group_by="dirichlet-alpha"))
    text = write_report(result).read_text()
    results = text[text.index("## Results"):]

    assert list(result.groups()) == [0.1, 1.0]
    assert results.index("### dirichlet-alpha = 0.1") < results.index("| `fedit-a0.1` |") \
        < results.index("### dirichlet-alpha = 1.0") < results.index("| `fedit-a1.0` |")
    assert (tmp_path / "exp" / "accuracy.png").exists()


def test_plot_metric_draws_any_per_round_key(tmp_path):
    result = sweep(tmp_path)

    path = plot_metric(result, "train_loss", tmp_path / "train_loss.png", "train loss", log=True)
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="no run of 'toy' has per-round 'eval_perplexity'"):
        plot_metric(result, "eval_perplexity", tmp_path / "p.png", "perplexity")


def test_resume_reuses_finished_runs_and_reruns_the_rest(tmp_path):
    sweep(tmp_path)
    again = FakeSimulate()
    result = sweep(tmp_path, again)
    assert again.calls == [] and all(r.reused for r in result.runs)
    assert result.summary("fedit").final_accuracy.mean == pytest.approx(0.83)

    # an unfinished run (metrics stop before the last round) and a changed setting rerun
    metrics = tmp_path / "exp" / "runs" / "fedit-seed1" / "metrics.json"
    metrics.write_text(json.dumps(json.loads(metrics.read_text())[:2]))
    changed = make_spec(variants=[Variant("fedit", {"strategy": "fedit"}),
                                  Variant("ffa-lora", {"strategy": "ffa-lora", "lora-rank": 2})])
    third = FakeSimulate()
    result = sweep(tmp_path, third, spec=changed)
    assert [(c["strategy"], c["seed"]) for c, _ in third.calls] == [
        ("fedit", 1), ("ffa-lora", 0), ("ffa-lora", 1)]
    assert [r.reused for r in result.runs] == [True, False, False, False]

    fresh = FakeSimulate()
    sweep(tmp_path, fresh, spec=changed, resume=False)
    assert len(fresh.calls) == 4


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    result = sweep(tmp_path, FakeSimulate(fail={("ffa-lora", 0)}))

    assert [r.error for r in result.runs] == [None, None, "RuntimeError: boom", None]
    assert len(result.failed_runs) == 1
    ffa = result.summary("ffa-lora")
    assert (ffa.runs, ffa.failed, ffa.final_accuracy.n) == (2, 1, 1)
    assert ffa.final_accuracy.mean == pytest.approx(0.74) and ffa.final_accuracy.std is None
    trace = tmp_path / "exp" / "runs" / "ffa-lora-seed0" / "error.txt"
    assert "RuntimeError: boom" in trace.read_text()
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved["runs"][2]["error"] == "RuntimeError: boom"
    text = write_report(result).read_text()
    assert "## Failed runs" in text
    assert "- `ffa-lora` seed 0: RuntimeError: boom (traceback: `runs/ffa-lora-seed0/error.txt`)" \
        in text
    assert "| `ffa-lora` | 0.740 | 0.740 | never (0/1) |" in text and "| 1/2 |" in text

    # resuming reruns only the failed run
    retry = FakeSimulate()
    result = sweep(tmp_path, retry)
    assert [(c["strategy"], c["seed"]) for c, _ in retry.calls] == [("ffa-lora", 0)]
    assert not result.failed_runs and not trace.exists()


def test_spec_rejects_bad_variants():
    with pytest.raises(ValueError, match="duplicate variant names"):
        make_spec(variants=[Variant("a", {}), Variant("a", {})])
    with pytest.raises(ValueError, match="name folders"):
        make_spec(variants=[Variant("a/b", {})])
    with pytest.raises(ValueError, match="runner sets seed"):
        make_spec(base_config={"seed": 3})
    with pytest.raises(ValueError, match="distinct"):
        run_experiment(make_spec(), seeds=[1, 1], results_dir=Path("unused"),
                       simulate_fn=FakeSimulate())


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown experiment 'nope'; known experiments: .*smoke"):
        get_experiment("nope")


def test_smoke_experiment_is_registered_with_valid_settings(tmp_path):
    from task.run_settings import RunSettings

    spec = get_experiment("smoke")
    assert [v.run_config["strategy"] for v in spec.variants] == ["fedit", "ffa-lora"]
    assert spec.num_clients == 2
    assert {"model": "minilm", "num-rounds": 2, "local-steps": 2, "max-length": 32}.items() \
        <= spec.base_config.items()
    for variant in spec.variants:
        RunSettings.from_run_config(spec.run_config(variant, 0, tmp_path))


def test_experiment_modules_register_themselves_when_first_asked_for(tmp_path, monkeypatch):
    (tmp_path / "my_lazy_exp.py").write_text(
        "from simulations.experiment import ExperimentSpec, Variant\n"
        "from simulations.experiments import register_experiment\n\n"
        "@register_experiment('my-lazy-exp')\n"
        "def make():\n"
        "    return ExperimentSpec('my-lazy-exp', 'Lazy.', [Variant('v', {})])\n")
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "simulations.experiments.my_lazy_exp", raising=False)
    monkeypatch.setattr(registry, "EXPERIMENTS", dict(registry.EXPERIMENTS))

    assert "my-lazy-exp" not in registry.EXPERIMENTS
    assert get_experiment("my-lazy-exp").description == "Lazy."
    with pytest.raises(ValueError, match="already registered"):
        register_experiment("my-lazy-exp")(lambda: make_spec())
    sys.modules.pop("simulations.experiments.my_lazy_exp", None)


def test_runner_and_report_modules_import_no_heavy_library():
    code = ("import sys, simulations.experiment, simulations.report, simulations.experiments\n"
            "heavy = [m for m in ('torch', 'flwr', 'ray', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_cli_experiment_runs_the_named_sweep(tmp_path, monkeypatch, capsys):
    calls: list[dict[str, Any]] = []

    def fake_run_experiment(spec, **kwargs):
        calls.append({"spec": spec, **kwargs})
        return run_experiment(spec, seeds=kwargs["seeds"], results_dir=kwargs["results_dir"],
                              simulate_fn=FakeSimulate(), resume=kwargs["resume"])

    monkeypatch.setattr(experiment_module, "run_experiment", fake_run_experiment)
    out = tmp_path / "smoke"
    code = main(["experiment", "smoke", "--seeds", "0,1", "--results-dir", str(out),
                 "--run-config", "num-rounds=3 learning-rate=0.01"])

    assert code == 0
    (call,) = calls
    assert call["seeds"] == [0, 1] and call["results_dir"] == out and call["resume"] is True
    assert call["simulate_options"] == {"cpus_per_client": 1.0, "gpus_per_client": None}
    spec = call["spec"]
    assert spec.name == "smoke" and spec.num_clients == 2
    assert spec.base_config["num-rounds"] == "3" and spec.base_config["learning-rate"] == "0.01"
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    report = (out / "report.md").read_text()
    assert (f"fedlora experiment smoke --seeds 0,1 --num-clients 2 --results-dir {out} "
            "--run-config 'num-rounds=3 learning-rate=0.01'") in report


def test_cli_experiment_options_and_errors(monkeypatch, capsys):
    calls: list[dict[str, Any]] = []

    def fake_run_experiment(spec, **kwargs):
        calls.append({"spec": spec, **kwargs})
        return SimpleNamespace(failed_runs=[], runs=[])

    monkeypatch.setattr(experiment_module, "run_experiment", fake_run_experiment)
    monkeypatch.setattr("simulations.report.write_report", lambda result, command: "r.md")
    main(["experiment", "smoke", "--num-clients", "3", "--no-resume"])
    assert calls[0]["spec"].num_clients == 3 and calls[0]["resume"] is False
    assert calls[0]["seeds"] == [0] and calls[0]["results_dir"] == Path("results/smoke")

    assert main(["experiment", "--list"]) == 0
    assert "smoke" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["experiment", "smoke", "--seeds", "0,x"])
    assert info.value.code == 2
    assert "--seeds takes comma-separated integers such as 0,1,2; got '0,x'" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "no-such"])
    assert "unknown experiment 'no-such'; known experiments: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "smoke", "--run-config", "lora-rank=0"])
    assert "lora-rank must be at least 1, got 0" in capsys.readouterr().err


def test_a_variant_can_run_on_the_first_seeds_only(tmp_path):
    spec = make_spec(variants=[Variant("fedit", {"strategy": "fedit"}),
                               Variant("ffa-lora", {"strategy": "ffa-lora"}, max_seeds=1)])
    fake = FakeSimulate()
    result = sweep(tmp_path, fake, spec=spec)
    assert sorted((r.variant, r.seed) for r in result.runs) == [
        ("fedit", 0), ("fedit", 1), ("ffa-lora", 0)]
    assert result.summary("ffa-lora").runs == 1
    again = ExperimentResult.load(tmp_path / "exp")
    assert [v.max_seeds for v in again.spec.variants] == [None, 1]


def test_the_same_folder_named_relative_or_absolute_reuses_its_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = make_spec()
    run_experiment(spec, seeds=[0, 1], results_dir=(tmp_path / "exp").resolve(),
                   simulate_fn=FakeSimulate())
    again = FakeSimulate()
    result = run_experiment(spec, seeds=[0, 1], results_dir=Path("exp"), simulate_fn=again)
    assert again.calls == [] and all(r.reused for r in result.runs)
