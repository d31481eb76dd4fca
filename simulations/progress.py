"""A live display of a simulation on a terminal; plain log lines everywhere else.

On a terminal (``Console.is_terminal``) a rich progress bar shows the round, the clients
that have replied in it, the elapsed time, an estimate of what remains and the last
accuracy, with the log scrolling above it. When output goes to a file or a CI log the
display is off and the one line per round that the server logs is the progress.
"""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RunProgress:
    """Feeds on the server's reply and round callbacks; a context manager around the run."""

    def __init__(self, num_rounds: int, metric: str = "accuracy",
                 console: Console | None = None) -> None:
        self.num_rounds = num_rounds
        self.metric = metric
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task: Any = None
        self.last_score = ""
        self._streams: list[tuple[logging.StreamHandler, Any]] = []

    def __enter__(self) -> RunProgress:
        if not self.live:
            return self
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[clients]}"), TimeElapsedColumn(),
            TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[score]}"),
            console=self.console, redirect_stderr=True, redirect_stdout=True)
        self.progress.start()
        self.task = self.progress.add_task(f"round 1/{self.num_rounds}",
                                           total=self.num_rounds, clients="", score="")
        # Flower's console handler keeps the stderr it was made with: point it at the
        # display's stream so log lines scroll above the bar instead of through it
        for handler in logging.getLogger("flwr").handlers:
            if isinstance(handler, logging.StreamHandler):
                self._streams.append((handler, handler.setStream(sys.stderr)))
        return self

    def on_reply(self, server_round: int, received: int, sent: int) -> None:
        """A training reply arrived (``received`` of ``sent`` in ``server_round``)."""
        if self.progress is None:
            return
        done = (server_round - 1) + (received / sent if sent else 0.0)
        self.progress.update(self.task, completed=done,
                             description=f"round {server_round}/{self.num_rounds}",
                             clients=f"clients {received}/{sent}")

    def on_round(self, record: dict[str, Any]) -> None:
        """A round finished (its record, with the evaluation)."""
        score = record.get(f"eval_{self.metric}")
        if score is not None:
            self.last_score = f"{self.metric.replace('_', ' ')} {score:.4f}"
        if self.progress is not None and record["round"] > 0:
            self.progress.update(self.task, completed=record["round"], score=self.last_score)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for handler, stream in self._streams:
            handler.setStream(stream)
        if self.progress is not None:
            self.progress.stop()
