"""The fedlora ServerApp: parse the run config once, then run the federation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.run import FederatedRun, ReplyCallback, RoundCallback
from task.run_settings import RunSettings


def make_server_app(
    overrides: Mapping[str, Any] | None = None, on_round: RoundCallback | None = None,
    settings: RunSettings | None = None, on_reply: ReplyCallback | None = None,
) -> ServerApp:
    """A ServerApp; ``overrides`` are run-config entries applied over the run's own.

    ``settings``: the run's settings already parsed in this process (a simulation); the
    ServerApp then runs them as they are instead of parsing its run config again.
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run = settings if settings is not None else RunSettings.from_run_config(
            {**context.run_config, **(overrides or {})})
        FederatedRun(run, on_round=on_round, on_reply=on_reply).execute(grid)

    return server_app


app = make_server_app()
