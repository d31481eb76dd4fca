"""Run a federation on this machine with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.supercore import log

from task.run_settings import RunSettings

if TYPE_CHECKING:
    from server.run import ReplyCallback, RoundCallback

#: the notice Flower 1.42 logs on every ``run_simulation`` call
RUN_SIMULATION_DEPRECATED = "The `run_simulation` function is deprecated"


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _flower_notice_filtered(text: str) -> Iterator[None]:
    """Drop Flower log lines containing ``text`` while the block runs (its logger only)."""
    logger = logging.getLogger("flwr")
    dropped = _DropMessage(text)
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)


def default_gpus_per_client(num_clients: int) -> float:
    """Share the visible GPUs among concurrently running clients (0 without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return min(1.0, torch.cuda.device_count() / max(1, min(num_clients, os.cpu_count() or 1)))


def backend_config(cpus_per_client: float, gpus_per_client: float,
                   ray_address: str = "") -> dict[str, Any]:
    """Ray backend settings: resources per client, and the cluster.

    Without ``ray_address`` Ray starts in this process with this machine's cores. With
    it (``auto``, or the head's ``host:port``) the simulation joins a running Ray cluster
    (``ray start --head`` on one machine, ``ray start --address=<head>`` on the others):
    each client is an actor placed wherever the cluster has its resources free, so the
    clients spread over the machines. fedlora and its model and data must be installed
    the same way on every node (the driver passes its ``PYTHONPATH`` along, Flower does).
    """
    init_args: dict[str, Any] = ({"address": ray_address} if ray_address else
                                 {"num_cpus": os.cpu_count() or 1, "include_dashboard": False})
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
        "init_args": init_args,
    }


def simulation_node_config(settings: RunSettings) -> dict[str, Any]:
    """What every simulated node gets as its node config, beside its partition.

    A deployed node pins the server key in a file and refuses plaintext; simulated nodes
    live for one run, whose server key is new, so they pin in the run's memory, and
    they accept plaintext exactly when the run does not encrypt. Their DP ledger lives
    for the run too, they accept ``dp-reproducible``, and they have no epsilon cap of
    their own (:data:`client.policy.SIMULATION_NODE_CONFIG`).
    """
    from client.policy import SIMULATION_NODE_CONFIG

    return {"server-pin-file": "",
            "require-encryption": settings.federation.encrypt_payloads,
            **SIMULATION_NODE_CONFIG}


def simulation_settings(run_config: Mapping[str, Any]) -> RunSettings:
    """The settings of a simulation: payload encryption is off unless the config says so."""
    return RunSettings.from_run_config({"encrypt-payloads": False, **run_config})


def simulate(
    run_config: Mapping[str, Any] | RunSettings,
    *,
    num_clients: int,
    cpus_per_client: float = 1.0,
    gpus_per_client: float | None = None,
    verbose: bool = False,
    on_round: RoundCallback | None = None,
    on_reply: ReplyCallback | None = None,
    ray_address: str = "",
) -> list[dict[str, Any]]:
    """Run a simulation and return the per-round metrics records.

    ``run_config``: the settings as parsed by :func:`simulation_settings` (then they are
    not parsed again in this process), or a flat run config to parse. The settings are
    validated before anything starts; Ray is shut down at the end, also on error or Ctrl-C.
    ``verbose``: Flower's DEBUG lines too. ``on_round`` gets each round's record,
    ``on_reply`` each training reply as it arrives (for a progress display).
    ``ray_address``: join this running Ray cluster instead of starting Ray here (see
    :func:`backend_config`); at the end this process disconnects, the cluster runs on.

    Raises:
        ValueError: a bad setting (before Ray starts).
        server.run.RunFailed: the run stopped, or ended, without training (the message
            quotes the clients' error).
        RuntimeError: the run ended without writing its final metrics.

    """
    settings = (run_config if isinstance(run_config, RunSettings)
                else simulation_settings(run_config))
    if num_clients < settings.federation.min_train_nodes:
        raise ValueError(f"--num-clients {num_clients} is below min-train-nodes "
                         f"{settings.federation.min_train_nodes}")
    settings.strategy.check_run(num_rounds=settings.federation.num_rounds,
                                lora_rank=settings.task.lora.lora_rank, num_clients=num_clients)
    overrides = settings.to_dict()
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    results = Path(settings.federation.results_dir)
    metrics_path = results / "metrics.json"
    metrics_path.unlink(missing_ok=True)
    (results / "summary.json").unlink(missing_ok=True)  # this run writes its own
    gpus = default_gpus_per_client(num_clients) if gpus_per_client is None else gpus_per_client
    for line in settings.describe(num_clients):
        log(INFO, "%s", line)
    try:
        # Flower 1.42 marks ``run_simulation`` deprecated in favour of ``flwr run``, which
        # starts the simulation runtime as separate processes from the app's
        # pyproject.toml: it cannot take this process's parsed settings or node
        # overrides, and a caller (tests, experiments, benchmarks) would lose the
        # in-process run and its Ray shutdown. Until Flower offers an in-process
        # replacement the call stays, and its deprecation notice (which the user cannot
        # act on) is filtered here, and only here.
        with _flower_notice_filtered(RUN_SIMULATION_DEPRECATED), warnings.catch_warnings():
            # fedlora relies on Ray hiding the GPUs from actors that reserve none (a
            # client with gpus-per-client 0 must train on the CPU), Ray's default today;
            # Ray warns at every start that a future version will stop doing so
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray",
                                    category=FutureWarning)
            run_simulation(
                server_app=make_server_app(settings=settings, on_reply=on_reply,
                                           on_round=on_round),
                client_app=make_client_app(overrides,
                                           node_overrides=simulation_node_config(settings)),
                num_supernodes=num_clients,
                backend_config=backend_config(  # type: ignore[arg-type]
                    cpus_per_client, gpus, ray_address),
                verbose_logging=verbose,
            )
    finally:
        _shutdown_ray()
    summary_path = results / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("failure"):
        from server.errors import RunFailed

        raise RunFailed(summary["failure"])
    if not metrics_path.exists():
        raise RuntimeError(f"the simulation wrote no metrics to {metrics_path}; see the log above")
    records: list[dict[str, Any]] = json.loads(metrics_path.read_text())
    if not records or (records[-1]["round"] != settings.federation.num_rounds
                       and not summary.get("stopped")):
        raise RuntimeError(f"the simulation stopped before its last round; see {metrics_path}")
    return records


def _shutdown_ray() -> None:
    """Stop Ray if this process started it (no-op otherwise)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        logging.getLogger(__name__).info("shutting down Ray")
        ray.shutdown()
