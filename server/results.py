"""The results folder: resolved config, per-round metrics (JSON and CSV), PEFT checkpoints."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from privacy.files import write_atomic

METRIC_COLUMNS = [
    "round", "eval_accuracy", "eval_loss", "eval_perplexity", "train_loss", "bytes_up",
    "bytes_down", "seconds", "eval_seconds", "num_sampled", "num_accepted", "num_rejected",
    "num_failed",
]


BASE_DELTAS_FILE = "base_deltas.safetensors"


class ResultsWriter:
    """Writes ``config.json``, ``metrics.json``, ``metrics.csv`` and adapter checkpoints."""

    def __init__(self, root: str | Path, config: dict[str, Any], keep_checkpoints: int = 2):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_checkpoints = keep_checkpoints
        self.records: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}
        write_atomic(self.root / "config.json", json.dumps(config, indent=2) + "\n")

    def add_round(self, record: dict[str, Any], details: dict[str, Any] | None = None) -> None:
        """Append one round's record (and per-module/per-client details); rewrite the files.

        The standard columns come first; strategy-specific ones follow in sorted order.
        """
        extra = sorted(set(record) - set(METRIC_COLUMNS))
        self.records.append({**{c: record.get(c) for c in METRIC_COLUMNS},
                             **{c: record[c] for c in extra}})
        write_atomic(self.root / "metrics.json", json.dumps(self.records, indent=2) + "\n")
        seen = {k for r in self.records for k in r}
        columns = METRIC_COLUMNS + sorted(seen - set(METRIC_COLUMNS))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        for row in self.records:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
        write_atomic(self.root / "metrics.csv", text.getvalue())
        if details:
            self.details[str(record["round"])] = details
            write_atomic(self.root / "details.json", json.dumps(self.details, indent=2) + "\n")

    def restore(self, records: list[dict[str, Any]], details: dict[str, Any]) -> None:
        """Continue from a saved run's records and details (on resume); rewrites the files."""
        self.records, self.details = [], dict(details)
        for record in records:
            self.add_round(record, self.details.get(str(record["round"])))

    def save_adapter(self, model: Any, name: str,
                     base_deltas: Mapping[str, np.ndarray] | None = None) -> Path:
        """Save the model's adapter in PEFT's format under ``name``, atomically.

        ``base_deltas``: the changes a strategy made to the frozen base weights, saved
        beside it as ``base_deltas.safetensors`` (``out x in``
        per adapted module, keyed ``<module>.base_delta``): the adapter alone is not the
        model without them.
        """
        target = self.root / name
        tmp = self.root / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(tmp))
        if base_deltas:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in base_deltas.items()},
                      str(tmp / BASE_DELTAS_FILE))
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
        return target

    def save_checkpoint(self, model: Any, server_round: int) -> Path:
        """Save ``checkpoints/round-NNN`` and prune all but the newest ``keep_checkpoints``."""
        path = self.save_adapter(model, f"checkpoints/round-{server_round:03d}")
        rounds = sorted((self.root / "checkpoints").glob("round-*"))
        for old in rounds[: max(len(rounds) - self.keep_checkpoints, 0)]:
            shutil.rmtree(old)
        return path

    def write_samples(self, server_round: int, samples: list[dict[str, str]]) -> Path | None:
        """Write a round's generated samples to ``samples/round-NNN.jsonl`` (none: nothing)."""
        if not samples:
            return None
        path = self.root / "samples" / f"round-{server_round:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        return path

    def write_json(self, name: str, payload: Any) -> Path:
        """Write an extra JSON file (a summary, rejections) into the folder."""
        path = self.root / name
        write_atomic(path, json.dumps(payload, indent=2) + "\n")
        return path
