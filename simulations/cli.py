"""The ``fedlora`` command line. Heavy libraries are imported only by the command that runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from simulations.generate import add_generate_parser
from simulations.presets import PRESETS, get_preset
from simulations.runconfig import parse_run_config

# CLI option -> run-config key, for the common settings.
SIMULATE_OPTIONS = {
    "strategy": "strategy",
    "rounds": "num-rounds",
    "model": "model",
    "task": "task",
    "dataset": "dataset",
    "seed": "seed",
    "results_dir": "results-dir",
    "partitioner": "partitioner",
    "dirichlet_alpha": "dirichlet-alpha",
    "rank": "lora-rank",
    "local_steps": "local-steps",
    "learning_rate": "learning-rate",
    "batch_size": "batch-size",
    "resume": "resume",
    "tracker": "tracker",
}


def _add_simulate(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federation on this machine (Flower simulation engine)",
        description="Run a federated LoRA fine-tuning simulation. Defaults: the embedded "
        "MiniLM-L6 encoder on BBC News, 4 clients, Dirichlet(0.5) partitions, FedIT.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a named simulation: " + "; ".join(
                       f"{p.name}: {p.description}" for p in PRESETS.values()))
    p.add_argument("--strategy", help="aggregation strategy (default fedit)")
    p.add_argument("--num-clients", type=int, default=None,
                   help="number of simulated clients (default 4, or the preset's)")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--model", help="minilm | smollm2 | tiny-bert | tiny-gpt2 | tiny-llama | "
                   "local dir | .gguf | hub id")
    p.add_argument("--task", help="classification | causal-lm | instruction")
    p.add_argument("--dataset", help="bbc-news | bbc-news-instruct | csv/json/jsonl/parquet "
                   "file | text folder | hub name")
    p.add_argument("--seed", type=int, help="run seed (data split, init, sampling)")
    p.add_argument("--results-dir", help="folder for metrics, checkpoints and plots")
    p.add_argument("--partitioner", choices=["auto", "iid", "dirichlet", "natural"])
    p.add_argument("--dirichlet-alpha", type=float, help="Dirichlet concentration (non-IID-ness)")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--local-steps", type=int, help="optimizer steps per client per round")
    p.add_argument("--learning-rate", type=float, help="client AdamW learning rate")
    p.add_argument("--batch-size", type=int, help="client batch size")
    p.add_argument("--tracker", help="experiment tracking: tensorboard, mlflow (comma-separated; "
                   "needs pip install 'fedlora[tracking]')")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the last completed round saved in the results folder")
    p.add_argument("--run-config", default="",
                   help='any other setting: "key=value key=value" (keys of [tool.flwr.app.config])')
    p.add_argument("--cpus-per-client", type=float, default=1.0,
                   help="CPU cores reserved per client (sets how many run at once)")
    p.add_argument("--ray-address", default="",
                   help="join a running Ray cluster (auto, or the head's host:port) "
                   "instead of starting Ray on this machine")
    p.add_argument("--gpus-per-client", type=float, default=None,
                   help="GPU share per client (default: shared evenly when CUDA is present)")
    p.set_defaults(func=_run_simulate)


def _add_centralised(sub: Any) -> None:
    p = sub.add_parser(
        "centralised",
        help="train the same model on the pooled training data (the reference for federations)",
    )
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in total")
    p.add_argument("--run-config", default="", help='settings as "key=value key=value"')
    p.set_defaults(func=_run_centralised)


def parse_seeds(text: str) -> list[int]:
    """Parse ``--seeds`` (comma-separated integers, e.g. ``0,1,2``).

    Raises:
        argparse.ArgumentTypeError: not integers, empty, or a seed repeated.

    """
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes comma-separated integers such as 0,1,2; got '{text}'") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds has a repeated seed: '{text}'")
    return seeds


def _add_experiment(sub: Any) -> None:
    p = sub.add_parser(
        "experiment",
        help="run a named sweep (variants x seeds) into a folder with a table, plots, report",
        description="Run every variant of a named experiment with every seed (one simulation "
        "each), then write results.json, report.md and plots into the results folder. "
        "Finished runs found there are reused, so an interrupted sweep continues.",
    )
    p.add_argument("name", nargs="?", help="the experiment (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--seeds", type=parse_seeds,
                   help="comma-separated seeds, e.g. 0,1,2 (default: the experiment's)")
    p.add_argument("--results-dir", help="results folder (default results/NAME)")
    p.add_argument("--num-clients", type=int, help="clients per run (default: the experiment's)")
    p.add_argument("--run-config", default="",
                   help='"key=value ..." over the experiment\'s base settings, for every run')
    p.add_argument("--no-resume", action="store_true",
                   help="rerun every run, even those already finished in the results folder")
    p.add_argument("--cpus-per-client", type=float, default=1.0,
                   help="CPU cores reserved per client (sets how many run at once)")
    p.add_argument("--gpus-per-client", type=float, default=None,
                   help="GPU share per client (default: shared evenly when CUDA is present)")
    p.set_defaults(func=_run_experiment)


def _add_certs(sub: Any) -> None:
    p = sub.add_parser(
        "certs",
        help="write TLS certificates, SuperNode keys and payload keys for a deployment",
        description="Generate a CA, the SuperLink's TLS certificate and one authentication "
        "key pair per SuperNode (the formats Flower 1.42 expects), plus the payload layer's "
        "keys: the ServerApp's X25519 key (server-payload.key) and its fingerprint "
        "(server-payload.pin), one Ed25519 signing key per node (client-<i>.key) and the "
        "list the ServerApp admits (allowed-clients.txt), into a folder; print the commands "
        "and node/run configs that use them.",
    )
    p.add_argument("--out", default="deploy/certs", help="folder to write into")
    p.add_argument("--hosts", default="localhost,127.0.0.1",
                   help="comma-separated DNS names / IP addresses of the SuperLink "
                   "(localhost and 127.0.0.1 are always included)")
    p.add_argument("--nodes", type=int, default=2,
                   help="number of nodes (a SuperNode key pair and a client key each)")
    p.add_argument("--days", type=int, default=365, help="certificate validity in days")
    p.add_argument("--max-lora-rank", type=int, default=16,
                   help="the LoRA rank cap the printed node configs declare (max-lora-rank)")
    p.add_argument("--overwrite", action="store_true", help="replace existing material")
    p.set_defaults(func=_run_certs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedlora`` command."""
    parser = argparse.ArgumentParser(
        prog="fedlora", description="Federated LoRA fine-tuning of language models on Flower."
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (also of bad settings)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Flower's DEBUG log lines too")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_centralised(sub)
    _add_experiment(sub)
    _add_certs(sub)
    add_generate_parser(sub)
    return parser


def simulate_num_clients(args: argparse.Namespace) -> int:
    """``--num-clients``, else the preset's, else 4."""
    if args.num_clients is not None:
        return int(args.num_clients)
    return get_preset(args.preset).num_clients if args.preset else 4


def simulate_run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run config for ``simulate``: the preset, ``--run-config`` over it, options last."""
    config: dict[str, Any] = dict(get_preset(args.preset).run_config) if args.preset else {}
    config.update(parse_run_config(args.run_config))
    for option, key in SIMULATE_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            config[key] = value
    num_clients = simulate_num_clients(args)
    config.setdefault("min-train-nodes", min(2, num_clients))
    config.setdefault("min-available-nodes", num_clients)
    return config


#: evaluation scores the summary table shows first, when a run has them
SCORE_ORDER = ("accuracy", "exact_match", "rouge_l", "perplexity", "loss")


def score_columns(records: list[dict[str, Any]]) -> list[str]:
    """The ``eval_*`` score keys of the records, the headline ones first, timings left out."""
    present = {k for r in records for k, v in r.items()
               if k.startswith("eval_") and k != "eval_seconds" and v is not None}
    ranked = [f"eval_{name}" for name in SCORE_ORDER if f"eval_{name}" in present]
    return ranked + sorted(present - set(ranked))


def _print_summary(records: list[dict[str, Any]], results_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedlora simulation")
    scores = score_columns(records)
    for column in ("round", *(k.removeprefix("eval_").replace("_", " ") for k in scores),
                   "train loss", "MB up", "MB down", "s"):
        table.add_column(column, justify="right")

    def fmt(value: Any, spec: str) -> str:
        return "" if value is None else format(value, spec)

    for r in records:
        table.add_row(str(r["round"]), *(fmt(r.get(k), ".4f") for k in scores),
                      fmt(r.get("train_loss"), ".4f"),
                      fmt(r["bytes_up"] / 1e6, ".2f"), fmt(r["bytes_down"] / 1e6, ".2f"),
                      fmt(r["seconds"], ".1f"))
    console = Console()
    console.print(table)
    console.print(f"results: {results_dir}")


def _run_simulate(args: argparse.Namespace) -> int:
    from simulations.progress import RunProgress
    from simulations.simulate import simulate, simulation_settings
    from task.tasks import get_task

    settings = simulation_settings(simulate_run_config(args))  # parsed once, passed down
    metric = get_task(settings.task.model.task).metric
    with RunProgress(settings.federation.num_rounds, metric=metric) as progress:
        records = simulate(settings, num_clients=simulate_num_clients(args),
                           cpus_per_client=args.cpus_per_client,
                           gpus_per_client=args.gpus_per_client, verbose=args.verbose,
                           ray_address=args.ray_address,
                           on_round=progress.on_round, on_reply=progress.on_reply)
    _print_summary(records, settings.federation.results_dir)
    return 0


def _run_centralised(args: argparse.Namespace) -> int:
    from simulations.centralised import train_centralised

    scores = train_centralised(parse_run_config(args.run_config), steps=args.steps)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in scores.items()))
    return 0


def experiment_command(args: argparse.Namespace, name: str, seeds: Sequence[int],
                       results_dir: str, num_clients: int) -> str:
    """The ``fedlora experiment`` command line that reproduces a sweep, all values explicit."""
    import shlex

    argv = ["fedlora", "experiment", name, "--seeds", ",".join(map(str, seeds)),
            "--num-clients", str(num_clients), "--results-dir", results_dir]
    if args.run_config:
        argv += ["--run-config", args.run_config]
    if args.cpus_per_client != 1.0:
        argv += ["--cpus-per-client", f"{args.cpus_per_client:g}"]
    if args.gpus_per_client is not None:
        argv += ["--gpus-per-client", f"{args.gpus_per_client:g}"]
    return shlex.join(argv)


def _list_experiments() -> int:
    from simulations.experiments import available_experiments

    for name, description in available_experiments().items():
        print(f"{name:16s} {description}")
    return 0


def _run_experiment(args: argparse.Namespace) -> int:
    if args.list:
        return _list_experiments()
    if not args.name:
        raise ValueError("name an experiment (fedlora experiment --list shows them)")
    from pathlib import Path

    from simulations.experiment import run_experiment
    from simulations.experiments import get_experiment
    from simulations.report import write_report
    from task.run_settings import RunSettings

    overrides = parse_run_config(args.run_config)
    base = get_experiment(args.name)
    spec = base.with_overrides(overrides, num_clients=args.num_clients)
    for key, names in spec.shadowed_overrides(overrides).items():
        print(f"note: --run-config {key}=... does not apply to variant(s) {', '.join(names)}, "
              "which set it themselves")
    seeds = args.seeds if args.seeds is not None else list(spec.seeds)
    results_dir = args.results_dir or f"results/{spec.name}"
    for variant in spec.variants:  # fail early, before any run, on a bad setting
        RunSettings.from_run_config(spec.settings_config(variant, seeds[0], Path(results_dir)))
    result = run_experiment(
        spec, seeds=seeds, results_dir=Path(results_dir), resume=not args.no_resume,
        simulate_options={"cpus_per_client": args.cpus_per_client,
                          "gpus_per_client": args.gpus_per_client})
    report = write_report(result, command=experiment_command(
        args, spec.name, seeds, results_dir, spec.num_clients))
    failed = len(result.failed_runs)
    if failed:
        print(f"{failed} of {len(result.runs)} runs failed; see the report", file=sys.stderr)
    print(f"report: {report}")
    return 1 if failed else 0


def _run_certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from privacy.certs import usage_text, write_deployment_material

    hosts = [host.strip() for host in args.hosts.split(",") if host.strip()]
    try:
        material = write_deployment_material(Path(args.out), hosts=hosts, num_nodes=args.nodes,
                                             days=args.days, overwrite=args.overwrite)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from exc
    print(usage_text(material, max_lora_rank=args.max_lora_rank), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlora`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from server.errors import RunFailed

    try:
        return int(args.func(args))
    except RunFailed as exc:  # the clients' error, once, last; the log above has the rest
        if args.debug:
            raise
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        if args.debug:
            raise
        from strategies.config import ConfigError

        if isinstance(exc, ConfigError):  # a bad setting: its message says what to change
            parser.exit(2, f"fedlora: error: {exc}\n")
        parser.exit(2, f"fedlora: error: {exc}\n(run `fedlora --debug {args.command} ...` "
                    "for the traceback)\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
