"""Federation overhead: fedlora vs a FlowerTune-style baseline on the same federated job.

Why one module of about 450 lines: a benchmark is one self-contained script (both arms,
the timing hooks and the report) so that its figures can be reproduced from one file.

A federated round should cost little more than the local training it contains. This runs
the same job, side by side in one invocation, through

- fedlora: ``simulations.simulate.simulate`` (Flower's Ray simulation with fedlora's
  ServerApp and ClientApp), with its defaults except what the comparison fixes, and
  ``eval-subset`` (``--eval-subset``, default 100; 0 = the full split every round): the
  intermediate rounds are evaluated on a fixed subset, the last round always on the full
  held-out split;
- baseline: ``bench/baseline_app.py``, a ClientApp/ServerApp in the style of Flower's
  FlowerTune LLM examples (model, tokenizer and tokenized partition built in every train
  call; Flower's ``FedAvg``; ``evaluate_fn`` rebuilds the model and evaluates on the full
  held-out split every round), on fedlora's task functions so the compute is identical;

same model, data, partitions, clients, rounds, local steps, batch, lr, LoRA, seeds, and
the same Ray backend settings (one CPU per client). Each variant runs in its own
subprocess (fresh Ray, its own peak memory); fedlora's starts with an empty tokenization
cache (``FEDLORA_CACHE_DIR``, as on a first run), the baseline's has it off. Per variant:

- wall: from just before the simulation starts Ray to after Ray is shut down;
- training compute: the critical-path local training the run contains. Each train call's
  ``train-seconds`` (time inside the training loop, reported by the client) is logged by
  a timing wrapper around the ClientApp (the same wrapper for both; fedlora's is put in
  place by substituting ``client.app.make_client_app`` in its subprocess). Ray runs
  P = min(clients, CPUs) clients at once, so a round's training cannot take less than
  max(longest client, sum over clients / P); training compute is the sum of that over
  the rounds;
- overhead = wall / training compute;
- client setup: time in the ClientApp before training starts: the ``setup-seconds``
  metric where the client reports it (the baseline does), otherwise the handler's wall
  time (measured by the wrapper) minus ``train-seconds``;
  ``setup_fraction_after_round1`` = setup / handler time, summed over calls of rounds
  2 and later;
- server evaluation: time of the server's per-round evaluate step (fedlora's includes
  its checkpoint), and the final held-out accuracy (a check that both trained the same);
- server peak memory: peak RSS (``ru_maxrss``) of the driver process, which runs the
  ServerApp (Ray's own processes and the client workers are not in it);
- client peak memory: peak RSS (``VmHWM``) of each Ray worker that ran train calls, as
  the timing wrapper reads it after each call (a worker may serve several clients).

``--llm``: the embedded LLM instead (the ``smollm2-bbc`` preset's task: SmolLM2-135M-
Instruct, ``instruction`` on ``bbc-news-instruct``, response-only loss, batch 8,
max-length 160, LoRA r=8 on q_proj/v_proj, lr 3e-3), 2 clients x 10 steps x 2 rounds
unless given, with ``eval-generate=false`` (response perplexity only, no generated
answers), ``eval-every`` = the rounds and ``--eval-subset 16`` (fedlora scores the
initial adapter on 16 held-out records while the clients set up, then only the last
round, on all 112; ``--run-config eval-every=1`` scores every round), so that the run is
mostly training. On SmolLM2 even perplexity is costly: scoring the 112 held-out records
takes about six training steps' compute (46 s against 7.3 s a step, one thread), and
the server's evaluation of round 0 shares the CPUs with the clients' set-up and first
steps.
``--model tiny-llama`` with it checks the wiring quickly.

Besides the whole run's overhead, every run reports the rounds' own: a round spans from
its first train call's start to its last reply (client setup, training, replies), and
``round_overhead`` = the rounds' summed spans / training compute; what lies between
rounds (aggregation, evaluation, messages) and after the last one (final evaluation,
final adapter, Ray shutdown) is reported beside it.

Usage: python bench/federation_overhead.py [--json] [--rounds 5] [--steps 20] [--clients 4]
  [--model minilm] [--dataset bbc-news] [--only fedlora|baseline] [--eval-subset 100]
  [--run-config "key=value ...", settings for both, e.g. the columns of --dataset]
  [--llm: the LLM case, defaults --model smollm2 --dataset bbc-news-instruct --clients 2
   --rounds 2 --steps 10 --eval-subset 16]

A quick check of the wiring: --clients 2 --rounds 2 --steps 2 (the ratios mean nothing
there: Ray start-up dwarfs two steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

VARIANTS = ("fedlora", "baseline")
BENCH_DIR = Path(__file__).resolve().parent
DEFAULTS = {"rounds": 5, "steps": 20, "clients": 4, "model": "minilm", "dataset": "bbc-news",
            "eval_subset": 100}
LLM_DEFAULTS = {"rounds": 2, "steps": 10, "clients": 2, "model": "smollm2",
                "dataset": "bbc-news-instruct", "eval_subset": 16}


def llm_run_config() -> dict[str, Any]:
    """The smollm2-bbc preset's task settings, evaluation without generated answers."""
    from simulations.presets import SMOLLM2_BBC

    skip = ("model", "dataset", "num-rounds", "local-steps", "results-dir")
    return {**{k: v for k, v in SMOLLM2_BBC.run_config.items() if k not in skip},
            "target-modules": "q_proj,v_proj", "eval-generate": False}


def vm_hwm_mb() -> float | None:
    """This process's peak RSS (``VmHWM``; a Ray worker's ``ru_maxrss`` may be its parent's)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class TimedClientApp(ClientApp):
    """Wraps a ClientApp; logs one JSON line per train call: round, times, client metrics."""

    def __init__(self, inner: ClientApp, log_path: str) -> None:
        super().__init__()
        self.inner = inner
        self.log_path = log_path

    def __call__(self, message: Message, context: Context) -> Message:
        started_at = time.time()
        started = time.perf_counter()
        reply = self.inner(message, context)
        seconds = time.perf_counter() - started
        is_train = message.metadata.message_type.split(".")[0] == "train"
        if is_train and not reply.has_error() and "metrics" in reply.content.metric_records:
            metrics = cast(dict[str, float], reply.content.metric_records["metrics"])
            record = {
                "round": cast(int, message.content.config_records["config"]["server-round"]),
                "partition": int(context.node_config["partition-id"]),
                "pid": os.getpid(),
                "start": started_at,
                "end": started_at + seconds,
                "handler_seconds": seconds,
                "train_seconds": float(metrics["train-seconds"]),
                "setup_seconds": (float(metrics["setup-seconds"]) if "setup-seconds" in metrics
                                  else None),
                "worker_peak_rss_mb": vm_hwm_mb(),
            }
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        return reply


# --- one variant, in its own process -----------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_fedlora(spec: dict[str, Any], calls_path: str, workdir: Path) -> dict[str, Any]:
    import flwr.simulation  # noqa: F401  (imported before the clock starts, as for the baseline)

    import client.app
    from simulations.simulate import simulate
    from task.run_settings import RunSettings

    make_app = client.app.make_client_app

    def timed_app(overrides: Any = None, **kwargs: Any) -> ClientApp:
        return TimedClientApp(make_app(overrides, **kwargs), calls_path)

    client.app.make_client_app = timed_app  # simulate() imports it at call time
    config = {**spec["run_config"], "eval-subset": spec["eval_subset"],
              "results-dir": str(workdir / "results")}
    started_at, started = time.time(), time.perf_counter()
    records = simulate(config, num_clients=spec["clients"])
    wall = time.perf_counter() - started
    from task.runtime import cached_runtime  # the driver's runtime, built by the ServerApp

    settings = RunSettings.from_run_config({"encrypt-payloads": False, **config})
    test_size = len(cached_runtime(settings.task).encoded_test())
    subset = spec["eval_subset"]
    rounds = settings.federation.num_rounds
    if 0 < subset < test_size and rounds > 1:
        evaluation = (f"rounds 0-{rounds - 1} on a fixed {subset}-example subset, round "
                      f"{rounds} on the full held-out split ({test_size})")
    else:
        evaluation = f"full held-out split ({test_size}) every round"
    if settings.federation.eval_every > 1:
        evaluation += f", every {settings.federation.eval_every} rounds and the last"
    evals = [{"round": r["round"], "seconds": r["eval_seconds"],
              "accuracy": r.get("eval_accuracy"), "loss": r.get("eval_loss")} for r in records]
    return {"wall_seconds": wall, "started_at": started_at, "evals": evals,
            "evaluation": evaluation}


def run_baseline(spec: dict[str, Any], calls_path: str, workdir: Path) -> dict[str, Any]:
    import baseline_app
    import ray
    from flwr.simulation import run_simulation

    from simulations.simulate import backend_config, default_gpus_per_client
    from task.settings import TaskSettings

    settings = TaskSettings.from_run_config(spec["run_config"])
    rounds, clients = spec["rounds"], spec["clients"]
    evals: list[dict[str, Any]] = []
    server_app = baseline_app.make_server_app(settings, num_rounds=rounds,
                                              on_evaluate=evals.append)
    client_app = TimedClientApp(baseline_app.make_client_app(settings), calls_path)
    started_at, started = time.time(), time.perf_counter()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                       backend_config=backend_config(  # type: ignore[arg-type]
                           1.0, default_gpus_per_client(clients)))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - started
    if not evals or evals[-1]["round"] != rounds:
        raise RuntimeError("the baseline run stopped before its last round; see the log above")
    return {"wall_seconds": wall, "started_at": started_at, "evals": evals,
            "evaluation": f"full held-out split ({evals[-1]['examples']}) every round"}


def run_child(variant: str, spec_path: Path, out_path: Path) -> None:
    if str(BENCH_DIR) not in sys.path:  # Ray workers import baseline_app from here too
        sys.path.insert(0, str(BENCH_DIR))
    spec = json.loads(spec_path.read_text())
    workdir = out_path.parent
    calls_path = str(workdir / f"{variant}-calls.jsonl")
    run = run_fedlora if variant == "fedlora" else run_baseline
    result = run(spec, calls_path, workdir)
    calls_file = Path(calls_path)
    calls = ([json.loads(line) for line in calls_file.read_text().splitlines()]
             if calls_file.exists() else [])
    result.update(variant=variant, calls=calls, peak_rss_mb=peak_rss_mb())
    out_path.write_text(json.dumps(result))


# --- the comparison ----------------------------------------------------------------------

def max_concurrency(calls: list[dict[str, Any]]) -> int:
    events = sorted([(c["start"], 1) for c in calls] + [(c["end"], -1) for c in calls],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def summarise(result: dict[str, Any], parallelism: int, expected_calls: int) -> dict[str, Any]:
    calls = result["calls"]
    if len(calls) != expected_calls:
        raise RuntimeError(f"{result['variant']}: {len(calls)} train calls logged, "
                           f"expected {expected_calls}")
    for c in calls:
        reported = c["setup_seconds"] is not None
        c["setup"] = c["setup_seconds"] if reported else c["handler_seconds"] - c["train_seconds"]
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for c in calls:
        by_round[c["round"]].append(c)
    round_training = {r: max(max(c["train_seconds"] for c in cs),
                             sum(c["train_seconds"] for c in cs) / parallelism)
                      for r, cs in sorted(by_round.items())}
    training = sum(round_training.values())
    later = [c for c in calls if c["round"] > 1]
    first = by_round[min(by_round)]
    evals = result["evals"]
    final = evals[-1] if evals else {}
    spans = {r: (min(c["start"] for c in cs), max(c["end"] for c in cs))
             for r, cs in sorted(by_round.items())}
    rounds = sorted(spans)
    round_wall = sum(end - start for start, end in spans.values())
    worker_rss: dict[str, float] = {}
    for c in calls:
        if c.get("worker_peak_rss_mb") is not None:
            key = str(c["pid"])
            worker_rss[key] = max(worker_rss.get(key, 0.0), c["worker_peak_rss_mb"])
    return {
        "wall_seconds": result["wall_seconds"],
        "training_compute_seconds": training,
        "overhead": result["wall_seconds"] / training,
        "round_wall_seconds": {str(r): end - start for r, (start, end) in spans.items()},
        "rounds_wall_seconds_total": round_wall,
        "round_overhead": round_wall / training,
        "between_rounds_seconds": sum(spans[b][0] - spans[a][1]
                                      for a, b in zip(rounds, rounds[1:], strict=False)),
        "after_last_round_seconds": (result["started_at"] + result["wall_seconds"]
                                     - spans[rounds[-1]][1]),
        "train_seconds_sum": sum(c["train_seconds"] for c in calls),
        "round_training_seconds": {str(r): t for r, t in round_training.items()},
        "setup_source": ("reported setup-seconds"
                         if all(c["setup_seconds"] is not None for c in calls)
                         else "handler time - train-seconds"),
        "setup_round1_mean_seconds": sum(c["setup"] for c in first) / len(first),
        "setup_later_mean_seconds": (sum(c["setup"] for c in later) / len(later)
                                     if later else None),
        "setup_fraction_after_round1": (sum(c["setup"] for c in later)
                                        / sum(c["handler_seconds"] for c in later)
                                        if later else None),
        "handler_seconds_sum": sum(c["handler_seconds"] for c in calls),
        "outside_training_fraction_after_round1": (
            sum(c["handler_seconds"] - c["train_seconds"] for c in later)
            / sum(c["handler_seconds"] for c in later) if later else None),
        "first_train_call_after_seconds": min(c["start"] for c in calls) - result["started_at"],
        "server_eval_seconds_total": sum(e["seconds"] for e in evals),
        "server_eval_seconds_per_round": ({str(e["round"]): e["seconds"] for e in evals}),
        "final_accuracy": final.get("accuracy"),
        "final_loss": final.get("loss"),
        "evaluation": result["evaluation"],
        "peak_rss_mb": result["peak_rss_mb"],
        "client_peak_rss_mb": worker_rss,
        "client_peak_rss_mb_max": max(worker_rss.values()) if worker_rss else None,
        "workers": len({c["pid"] for c in calls}),
        "observed_max_concurrency": max_concurrency(calls),
        "calls": calls,
    }


def run_variant(variant: str, spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    workdir = tmp / variant
    workdir.mkdir()
    spec_path, out_path = workdir / "spec.json", workdir / "result.json"
    spec_path.write_text(json.dumps(spec))
    print(f"--- running {variant} (its log follows on stderr) ---", file=sys.stderr, flush=True)
    # fedlora starts with an empty tokenization cache, as a first run does; the baseline
    # tokenizes in every train call, as Flower's examples do
    cache = str(workdir / "encode-cache") if variant == "fedlora" else "off"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", variant,
                           "--spec", str(spec_path), "--out", str(out_path)],
                          stdout=sys.stderr, check=False,
                          env={**os.environ, "FEDLORA_CACHE_DIR": cache})
    if proc.returncode != 0 or not out_path.exists():
        raise SystemExit(f"the {variant} run failed (exit {proc.returncode}); see its log above")
    return json.loads(out_path.read_text())


def fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{unit}"


def print_table(out: dict[str, Any]) -> None:
    cfg = out["config"]
    print(f"federation overhead: {cfg['clients']} clients x {cfg['steps']} steps x "
          f"{cfg['rounds']} rounds, model {cfg['model']}, data {cfg['dataset']}; "
          f"{out['parallelism']} clients train at once")
    names = [v for v in VARIANTS if out[v] is not None]
    rows = [
        ("wall time (Ray start to shutdown)", "wall_seconds", " s", 1),
        ("training compute (critical path)", "training_compute_seconds", " s", 1),
        ("overhead = wall / training compute", "overhead", "x", 3),
        ("rounds: first call start to last reply, summed", "rounds_wall_seconds_total", " s", 1),
        ("round overhead = rounds / training compute", "round_overhead", "x", 3),
        ("between rounds (aggregate, evaluate, messages)", "between_rounds_seconds", " s", 1),
        ("after the last reply (final eval, shutdown)", "after_last_round_seconds", " s", 1),
        ("local training, sum over train calls", "train_seconds_sum", " s", 1),
        ("client setup per call, round 1 (mean)", "setup_round1_mean_seconds", " s", 2),
        ("client setup per call, later rounds (mean)", "setup_later_mean_seconds", " s", 2),
        ("setup / client round time after round 1", "setup_fraction_after_round1", "", 3),
        ("  (handler time outside training, same ratio)",
         "outside_training_fraction_after_round1", "", 3),
        ("first train call after start (Ray, server init)", "first_train_call_after_seconds",
         " s", 1),
        ("server evaluate step, all rounds", "server_eval_seconds_total", " s", 1),
        ("final held-out accuracy", "final_accuracy", "", 4),
        ("final held-out loss", "final_loss", "", 4),
        ("server peak RSS (driver process)", "peak_rss_mb", " MB", 0),
        ("client peak RSS (largest Ray worker)", "client_peak_rss_mb_max", " MB", 0),
        ("Ray workers used / max concurrent calls", None, "", 0),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  " + "  ".join(f"{n:>12}" for n in names))
    for label, key, unit, digits in rows:
        if key is None:
            cells = [f"{out[n]['workers']} / {out[n]['observed_max_concurrency']}" for n in names]
        else:
            cells = [fmt(out[n][key], unit, digits) for n in names]
        print(f"{label:{width}}  " + "  ".join(f"{c:>12}" for c in cells))
    for n in names:
        print(f"{n} evaluation: {out[n]['evaluation']}; client setup: {out[n]['setup_source']}")
        rss = ", ".join(f"{v:.0f} MB" for v in out[n]["client_peak_rss_mb"].values())
        print(f"{n} client peak RSS per Ray worker: {rss or '-'}")
    print("training compute = sum over rounds of max(longest client, sum of clients / "
          f"{out['parallelism']}); a round = its first train call's start to its last reply")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, help="default 5 (--llm: 2)")
    parser.add_argument("--steps", type=int, help="local steps per round, default 20 (--llm: 10)")
    parser.add_argument("--clients", type=int, help="default 4 (--llm: 2)")
    parser.add_argument("--model", help="default minilm (--llm: smollm2)")
    parser.add_argument("--dataset", help="default bbc-news (--llm: bbc-news-instruct)")
    parser.add_argument("--llm", action="store_true",
                        help="the LLM case: the smollm2-bbc preset's task, eval-generate=false")
    parser.add_argument("--only", choices=VARIANTS)
    parser.add_argument("--eval-subset", type=int,
                        help="fedlora's eval-subset (0: the full held-out split every round); "
                             "default 100 (--llm: 16)")
    parser.add_argument("--run-config", default="",
                        help="extra 'key=value ...' settings for both (e.g. text-column=body)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.spec, args.out)
        return
    for key, value in (LLM_DEFAULTS if args.llm else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.clients < 2:
        parser.error("--clients must be at least 2 (both apps need two nodes per round)")
    from simulations.runconfig import parse_run_config

    llm = {**llm_run_config(), "eval-every": args.rounds} if args.llm else {}
    run_config: dict[str, Any] = {**llm,
                                  "model": args.model, "dataset": args.dataset,
                                  "num-rounds": args.rounds, "local-steps": args.steps,
                                  **parse_run_config(args.run_config)}
    spec = {"run_config": run_config, "clients": args.clients, "rounds": args.rounds,
            "eval_subset": args.eval_subset}
    parallelism = min(args.clients, os.cpu_count() or 1)  # one CPU per client, as simulate
    out: dict[str, Any] = {
        "config": {"rounds": args.rounds, "steps": args.steps, "clients": args.clients,
                   "model": args.model, "dataset": args.dataset, "llm": args.llm,
                   "eval_subset": args.eval_subset, "run_config": run_config},
        "parallelism": parallelism,
        "training_compute": "sum over rounds of max(longest client's train-seconds, "
                            "sum of the round's train-seconds / parallelism)",
        "fedlora": None, "baseline": None,
    }
    with tempfile.TemporaryDirectory(prefix="fed-overhead-") as tmp:
        for variant in ([args.only] if args.only else VARIANTS):
            result = run_variant(variant, spec, Path(tmp))
            out[variant] = summarise(result, parallelism, args.clients * args.rounds)
    fed, base = out["fedlora"], out["baseline"]
    out["overhead"] = fed["overhead"] if fed else None
    out["baseline_overhead"] = base["overhead"] if base else None
    out["setup_fraction_after_round1"] = fed["setup_fraction_after_round1"] if fed else None
    out["baseline_setup_fraction_after_round1"] = (base["setup_fraction_after_round1"]
                                                   if base else None)
    print_table(out)
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
