"""The server's round loop: what happens in which order (FederatedRun.execute)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import server.run
from privacy.transports import PLAIN
from server.run import FederatedRun
from strategies.adapter import LoraAdapter
from task.run_settings import RunSettings


class FakeGrid:
    """Records pushes and pulls; every pushed message has its reply on the next pull."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.unanswered: list[str] = []

    def push_messages(self, messages: Any) -> list[str]:
        ids = [f"m{len(self.events)}-{i}" for i, _ in enumerate(messages)]
        self.events.append(("push", len(ids)))
        self.unanswered += ids
        return ids

    def pull_messages(self, ids: list[str]) -> list[Any]:
        self.events.append(("pull", len(ids)))
        replies = [SimpleNamespace(has_error=lambda: False,
                                   metadata=SimpleNamespace(reply_to_message_id=i))
                   for i in ids]
        self.unanswered = [i for i in self.unanswered if i not in ids]
        return replies


class FakeRunner:
    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def summary(self) -> None:
        pass

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (1, 2)]

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[None, None]:
        self.events.append(("aggregate", server_round, len(list(replies))))
        return None, None

    def configure_evaluate(self, *args: Any) -> list[Any]:
        return []


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FederatedRun:
    events: list[Any] = []
    run = FederatedRun.__new__(FederatedRun)
    run.settings = RunSettings.from_run_config({"num-rounds": 2, "encrypt-payloads": False})
    adapter = LoraAdapter.from_state_dict({"m.lora_A.weight": np.ones((2, 3), np.float32),
                                           "m.lora_B.weight": np.zeros((4, 2), np.float32)},
                                          alpha=16.0)
    run.runtime = SimpleNamespace(initial_adapter=adapter, set_adapter=lambda a: None,
                                  model=None, base_weights=dict,
                                  data=SimpleNamespace(unusable=0))
    run.runner = FakeRunner(events)
    run.transport = PLAIN
    run.strategy = SimpleNamespace(history={}, initial_global=lambda adapter, weights: adapter)
    run.writer = SimpleNamespace(root=tmp_path, records=[{"round": 2}],
                                 save_adapter=lambda *a, **k: None, write_json=lambda *a: None)
    run.evaluate = lambda r, arrays: events.append(("evaluate", r))  # type: ignore[method-assign]
    run.save_state = lambda r, arrays: events.append(("save", r))  # type: ignore[method-assign]
    monkeypatch.setattr(server.run, "plot_metrics", lambda *a, **k: None)
    run.events = events  # type: ignore[attr-defined]
    return run


def test_initial_adapter_is_evaluated_after_round_one_is_sent(run: FederatedRun) -> None:
    run.execute(FakeGrid(run.events))  # type: ignore[attr-defined]
    assert run.events == [  # type: ignore[attr-defined]
        ("push", 2), ("evaluate", 0), ("pull", 2), ("aggregate", 1, 2), ("evaluate", 1),
        ("save", 1),
        ("push", 2), ("pull", 2), ("aggregate", 2, 2), ("evaluate", 2), ("save", 2),
    ]


def test_a_resumed_run_does_not_evaluate_round_zero(run: FederatedRun) -> None:
    saved = SimpleNamespace(round=1, arrays=run.runtime.initial_adapter.to_state_dict())
    run.settings = RunSettings.from_run_config({"num-rounds": 2, "encrypt-payloads": False,
                                                "resume": True})
    run.resume = lambda: saved  # type: ignore[method-assign]
    run.execute(FakeGrid(run.events))  # type: ignore[attr-defined]
    assert [e for e in run.events if e[0] == "evaluate"] == [("evaluate", 2)]  # type: ignore[attr-defined]
