"""Experiment tracking through a real simulation, read back with each tool's own reader."""

import json

import pytest

from simulations.simulate import simulate
from tests.conftest import tiny_run_config
from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def test_tensorboard_and_mlflow_hold_every_round(tmp_path, tiny_bert_dir, toy_csv):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = tmp_path / "tracked"
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "num-rounds": 2, "results-dir": str(results), "local-steps": 2,
        "tracker": "tensorboard,mlflow"})
    records = simulate(config, num_clients=2, gpus_per_client=0.0)

    events = EventAccumulator(str(results / "tensorboard"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("eval_accuracy")]
    assert accuracy == [(r["round"], pytest.approx(r["eval_accuracy"])) for r in records]
    assert [e.step for e in events.Scalars("bytes_up")] == [0, 1, 2]
    assert {"train_loss", "eval_loss", "bytes_down"} <= set(events.Tags()["scalars"])
    assert "config" in " ".join(events.Tags()["tensors"])  # the run config as text

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "fedlora"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["lora-rank"] == "4" and run.data.params["num-rounds"] == "2"
    history = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert [(m.step, m.value) for m in history] == [
        (r["round"], pytest.approx(r["eval_accuracy"])) for r in records]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"final_adapter", "summary.json", "metrics.csv"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "final_adapter")}
    assert "final_adapter/adapter_model.safetensors" in adapter
    assert run.info.status == "FINISHED"
    assert json.loads((results / "summary.json").read_text())["failure"] is None


def test_an_unknown_tracker_is_refused_before_anything_runs():
    from strategies.config import ConfigError
    from task.run_settings import RunSettings

    with pytest.raises(ConfigError, match="tracker \\['wandb'\\] is not one of tensorboard"):
        RunSettings.from_run_config({"tracker": "tensorboard,wandb"})
