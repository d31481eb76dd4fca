"""Experiment tracking: each round's figures to TensorBoard or MLflow, beside the results folder.

``tracker`` (a run-config setting, ``--tracker`` on ``fedlora simulate``) names the
trackers, comma-separated:

- ``tensorboard``: event files in ``<results-dir>/tensorboard`` (``tensorboard --logdir
  <results-dir>/tensorboard``): every numeric figure of a round record as a scalar at
  step ``round`` (accuracy and the task's metric, losses, bytes, epsilons, aggregation
  error, secure-aggregation stages), and the resolved run config as text;
- ``mlflow``: a local MLflow store, ``sqlite:///<results-dir>/mlflow.db`` with artifacts in
  ``<results-dir>/mlflow-artifacts`` (``mlflow ui --backend-store-uri sqlite:///...``), or
  the server named by ``mlflow-tracking-uri``: the run config as params, the same
  figures per round as metrics, and at the end the final adapter, ``summary.json`` and
  ``metrics.csv`` as artifacts.

Both libraries are optional (``pip install "fedlora[tracking]"``); asking for a tracker
that is not installed is an error before the run starts. W&B is not offered: its
offline mode still needs an account to view runs, which TensorBoard and MLflow do not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

#: MLflow accepts at most this many params per call
MLFLOW_PARAM_BATCH = 100


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric figures of a round record (the round number aside)."""
    out = {}
    for key, value in record.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


class Tracker(Protocol):
    """Receives the run's config once, each round's record, and the finished results."""

    def log_round(self, record: Mapping[str, Any]) -> None:
        """One round's record (round 0 is the initial adapter)."""

    def finish(self, results_dir: Path) -> None:
        """The run is over; its results folder is written."""


class TensorBoardTracker:
    """Scalars per round and the config as text, in ``<results-dir>/tensorboard``."""

    def __init__(self, results_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(results_dir / "tensorboard"))
        text = "\n".join(f"    {k} = {json.dumps(v)}" for k, v in sorted(config.items()))
        self.writer.add_text("config", text, global_step=0)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Every figure of the round as a scalar at step ``round``."""
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["round"]))
        self.writer.flush()

    def finish(self, results_dir: Path) -> None:
        """Close the event file."""
        self.writer.close()


class MLflowTracker:
    """A run in a local (or named) MLflow store: params, metrics per round, artifacts."""

    def __init__(self, results_dir: Path, config: Mapping[str, Any], uri: str = "",
                 experiment: str = "fedlora") -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri or f"sqlite:///{results_dir.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else \
            self.client.create_experiment(experiment, artifact_location=(
                None if uri else (results_dir.resolve() / "mlflow-artifacts").as_uri()))
        self.run_id = self.client.create_run(
            experiment_id, run_name=str(config.get("results-dir", "fedlora"))).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in sorted(config.items())]
        for start in range(0, len(params), MLFLOW_PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_PARAM_BATCH])

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Every figure of the round as a metric at step ``round``."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["round"])
        metrics = [Metric(k, v, now, step) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, results_dir: Path) -> None:
        """The final adapter, ``summary.json`` and ``metrics.csv`` as artifacts; end the run."""
        adapter = results_dir / "final_adapter"
        if adapter.is_dir():
            self.client.log_artifacts(self.run_id, str(adapter), "final_adapter")
        for name in ("summary.json", "metrics.csv"):
            if (results_dir / name).exists():
                self.client.log_artifact(self.run_id, str(results_dir / name))
        self.client.set_terminated(self.run_id)


def make_trackers(names: tuple[str, ...], results_dir: Path, config: Mapping[str, Any],
                  mlflow_uri: str = "") -> list[Tracker]:
    """The trackers named, ready to log (``config``: the resolved run config).

    Raises:
        ValueError: a tracker whose library is not installed, with the install command.

    """
    trackers: list[Tracker] = []
    for name in names:
        try:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(results_dir, config))
            elif name == "mlflow":
                trackers.append(MLflowTracker(results_dir, config, mlflow_uri))
        except ImportError as exc:
            raise ValueError(f"tracker={name} needs its library ({exc.name} is not "
                             "installed): pip install 'fedlora[tracking]'") from exc
    return trackers
