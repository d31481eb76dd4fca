"""The server's resumable state: written after every round, atomically, checked on load.

A round's state is two files in ``<results-dir>/state/``: the global adapter
(``round-NNNN.safetensors``) and a JSON manifest (``round-NNNN.json``) holding the round
number, the SHA-256 of the adapter file, the strategy's state (sampling generator,
ranks), the metrics records so far and the per-round details. Each file is written to a
temporary name, flushed and renamed, adapter first: the manifest is the commit mark, so
a crash leaves either a complete round or an orphan adapter that is ignored. On load the
newest round whose manifest parses and whose adapter matches its digest wins; a torn or
corrupted one is reported and the previous round is used.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.supercore import log
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from privacy.files import write_atomic

STATE_DIR = "state"
FORMAT = 1
_NAME = re.compile(r"round-(\d{4,})\.json")


@dataclass
class ServerState:
    """Everything a resumed run needs to continue from the end of ``round``."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


class StateStore:
    """Saves and loads :class:`ServerState` under ``<results-dir>/state``; keeps the newest few."""

    def __init__(self, results_dir: str | Path, keep: int = 2) -> None:
        self.folder = Path(results_dir) / STATE_DIR
        self.keep = max(keep, 2)  # the previous round is the fallback for a torn newest one

    def save(self, state: ServerState) -> Path:
        """Write the round's adapter, then its manifest; prune older rounds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"round-{state.round:04d}"
        blob = save_safetensors({k: np.ascontiguousarray(v) for k, v in state.arrays.items()})
        write_atomic(self.folder / f"{stem}.safetensors", blob, 0o644)
        manifest = {
            "format": FORMAT,
            "round": state.round,
            "adapter_sha256": hashlib.sha256(blob).hexdigest(),
            "strategy": state.strategy,
            "records": state.records,
            "details": state.details,
            "settings": state.settings,
        }
        path = self.folder / f"{stem}.json"
        write_atomic(path, (json.dumps(manifest, indent=1) + "\n").encode(), 0o644)
        self._prune()
        return path

    def rounds(self) -> list[int]:
        """Rounds with a manifest on disk, newest first (not yet checked)."""
        if not self.folder.is_dir():
            return []
        found = [int(m.group(1)) for p in self.folder.iterdir()
                 if (m := _NAME.fullmatch(p.name))]
        return sorted(found, reverse=True)

    def load_latest(self) -> ServerState | None:
        """The newest intact round's state; ``None`` when there is none."""
        for server_round in self.rounds():
            try:
                return self.load(server_round)
            except ValueError as exc:
                log(WARNING, "resume: the state of round %d is unusable (%s); trying the "
                    "round before", server_round, exc)
        return None

    def load(self, server_round: int) -> ServerState:
        """The state of ``server_round``.

        Raises:
            ValueError: the manifest or the adapter is missing, torn or does not match.

        """
        stem = self.folder / f"round-{server_round:04d}"
        try:
            manifest = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
            blob = stem.with_suffix(".safetensors").read_bytes()
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read it: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"manifest format is not {FORMAT}")
        if manifest.get("round") != server_round:
            raise ValueError(f"manifest says round {manifest.get('round')}")
        if hashlib.sha256(blob).hexdigest() != manifest.get("adapter_sha256"):
            raise ValueError("the adapter file does not match its digest (torn write?)")
        try:
            arrays = dict(load_safetensors(blob))
        except Exception as exc:  # noqa: BLE001 - any parse failure means unusable
            raise ValueError(f"the adapter file does not parse: {exc}") from exc
        return ServerState(round=server_round, arrays=arrays,
                           strategy=manifest.get("strategy", {}),
                           records=manifest.get("records", []),
                           details=manifest.get("details", {}),
                           settings=manifest.get("settings", {}))

    def _prune(self) -> None:
        for server_round in self.rounds()[self.keep:]:
            for suffix in (".json", ".safetensors"):
                (self.folder / f"round-{server_round:04d}{suffix}").unlink(missing_ok=True)
