"""Experiment sweeps: variants x seeds of simulations, summarised into ``results.json``.

Why one module of about 630 lines: the sweep's spec, its runner (with resume) and its
summary share one results layout; they change together when that layout does.

An :class:`ExperimentSpec` names a set of :class:`Variant` run configs; :func:`run_experiment`
runs every variant with every seed (one simulation each, in its own folder under
``<results_dir>/runs``), reuses runs that already finished (so an interrupted sweep
continues where it stopped), records failed runs and carries on, and summarises each
variant over its seeds. :mod:`simulations.report` turns the result into a report with plots.

This module imports only the standard library at module level, so the experiment registry
and ``fedlora experiment --list`` stay fast; the simulation runner is imported when a sweep
runs without its own ``simulate_fn``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privacy.files import write_atomic

SimulateFn = Callable[..., list[dict[str, Any]]]

RESULTS_FILE = "results.json"
RUN_MARKER = "experiment-run.json"
ERROR_FILE = "error.txt"
# Keys the runner sets for every run; an experiment must not set them itself.
RUNNER_KEYS = ("seed", "results-dir")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$")


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment: a name and the run-config entries that define it.

    Attributes:
        name: short, folder-safe name (letters, digits and ``_ . + = , -``).
        run_config: run-config entries laid over the experiment's ``base_config``.
        max_seeds: run only the sweep's first this-many seeds (e.g. a control that is
            shown once); None = every seed.

    """

    name: str
    run_config: dict[str, object]
    max_seeds: int | None = None


@dataclass(frozen=True)
class ExperimentSpec:
    """A named sweep: variants run with every seed on the same base settings.

    Attributes:
        name: the experiment's name (also the default results folder name).
        description: what the experiment shows, for the report.
        variants: the arms compared; names must be unique.
        num_clients: simulated clients per run.
        base_config: run-config entries shared by every variant (variants override them).
        group_by: a run-config key (e.g. ``"dirichlet-alpha"``): the report has one table
            and one accuracy subplot per value of this key.
        threshold: accuracy for the "rounds to reach threshold" summary.
        seeds: the seeds used when the caller gives none.
        hooks: a module that extends the sweep (empty: none). It may define
            ``simulate(run_config, *, num_clients, **options)`` to run each run (e.g. a
            simulation followed by an audit), ``report_sections(result) -> list[str]``
            (markdown lines added to the report) and ``write_plots(result) -> list[Path]``;
            ``EXPERIMENT_KEYS``, run-config keys its ``simulate`` reads and removes itself
            (they are not fedlora settings; see :meth:`settings_config`).

    Raises:
        ValueError: no variants, duplicate or unsafe variant names, a config that sets
            ``seed`` or ``results-dir`` (the runner sets them), or fewer than 1 client.

    """

    name: str
    description: str
    variants: list[Variant]
    num_clients: int = 4
    base_config: dict[str, object] = field(default_factory=dict)
    group_by: str | None = None
    threshold: float = 0.8
    seeds: tuple[int, ...] = (0, 1, 2)
    hooks: str = ""
    #: more per-round scores the report follows from round 0 (before training) to the last
    gain_keys: tuple[str, ...] = ()

    @property
    def score_key(self) -> str:
        """The record key that scores a round: ``eval_`` + the task's metric (accuracy...).

        The summaries' "accuracy" figures (final, best, rounds to threshold, the curve)
        are this score; :mod:`task.tasks` says which one each task ranks rounds by.
        """
        from task.tasks import get_task

        return f"eval_{get_task(str(self.base_config.get('task', 'classification'))).metric}"

    def hook(self, name: str) -> Any:
        """The function ``name`` of the ``hooks`` module, or None."""
        if not self.hooks:
            return None
        import importlib

        return getattr(importlib.import_module(self.hooks), name, None)

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError(f"experiment '{self.name}' has no variants")
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"experiment '{self.name}': duplicate variant names {duplicates}")
        bad = [n for n in names if not _NAME_PATTERN.match(n)]
        if bad:
            raise ValueError(f"experiment '{self.name}': variant names {bad} must be made of "
                             "letters, digits and _ . + = , - (they name folders)")
        for where, config in [("base_config", self.base_config)] + [
                (f"variant '{v.name}'", v.run_config) for v in self.variants]:
            clash = [k for k in RUNNER_KEYS if k in config]
            if clash:
                raise ValueError(f"experiment '{self.name}': {where} sets {clash}; the runner "
                                 "sets seed and results-dir for every run")
        if self.num_clients < 1:
            raise ValueError(f"experiment '{self.name}': num_clients must be at least 1, "
                             f"got {self.num_clients}")

    def variant_config(self, variant: Variant) -> dict[str, object]:
        """The variant's settings: the base config with the variant's entries over it."""
        return {**self.base_config, **variant.run_config}

    def run_config(self, variant: Variant, seed: int, run_dir: Path) -> dict[str, object]:
        """The full run config of one run (variant x seed), as passed to ``simulate_fn``.

        ``min-train-nodes`` and ``min-available-nodes`` default to what ``fedlora simulate``
        uses for ``num_clients`` (all clients connected before sampling); the experiment's
        configs may override them.
        """
        return {
            "min-train-nodes": min(2, self.num_clients),
            "min-available-nodes": self.num_clients,
            **self.variant_config(variant),
            "seed": seed,
            "results-dir": str(run_dir),
        }

    def settings_config(self, variant: Variant, seed: int, run_dir: Path) -> dict[str, object]:
        """:meth:`run_config` without the hooks' own keys: what fedlora parses as settings."""
        own = set(self.hook("EXPERIMENT_KEYS") or ())
        return {k: v for k, v in self.run_config(variant, seed, run_dir).items()
                if k not in own}

    def group_of(self, variant: Variant) -> object | None:
        """The variant's value of the ``group_by`` key (None without grouping)."""
        if self.group_by is None:
            return None
        return self.variant_config(variant).get(self.group_by)

    def with_overrides(
        self, overrides: Mapping[str, object] | None = None, *, num_clients: int | None = None,
    ) -> ExperimentSpec:
        """A copy with ``overrides`` laid over ``base_config`` and, if given, ``num_clients``.

        Variants keep their own entries: an override of a key a variant sets does not
        change that variant (see :meth:`shadowed_overrides`).
        """
        return dataclasses.replace(
            self, base_config={**self.base_config, **(overrides or {})},
            num_clients=self.num_clients if num_clients is None else num_clients)

    def shadowed_overrides(self, overrides: Mapping[str, object]) -> dict[str, list[str]]:
        """Override keys that some variants set themselves: key -> those variants' names."""
        shadowed: dict[str, list[str]] = {}
        for key in overrides:
            names = [v.name for v in self.variants if key in v.run_config]
            if names:
                shadowed[key] = names
        return shadowed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentSpec:
        """Rebuild a spec written by :meth:`to_dict`."""
        return cls(**{**data, "variants": [Variant(**v) for v in data["variants"]],
                      "seeds": tuple(data.get("seeds", (0, 1, 2))),
                      "gain_keys": tuple(data.get("gain_keys", ()))})


@dataclass
class RunResult:
    """One run (variant x seed): its per-round records, or the error that stopped it.

    Attributes:
        variant: the variant's name.
        seed: the run's seed.
        run_dir: the run's results folder.
        records: the per-round metrics records (empty when the run failed).
        error: ``"ExceptionType: message"`` when the run failed, else None.
        reused: True when the records were read from a finished earlier run.
        wall_seconds: the run's wall time in this sweep (None when reused).

    """

    variant: str
    seed: int
    run_dir: str
    records: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    reused: bool = False
    wall_seconds: float | None = None

    @property
    def ok(self) -> bool:
        """Whether the run finished and has records."""
        return self.error is None and bool(self.records)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of one figure over seeds.

    ``std`` is None with fewer than two values; ``mean`` is None with none.
    """

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        """Summarise the finite values among ``values`` (None and NaN are left out)."""
        kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not kept:
            return cls(None, None, 0)
        std = statistics.stdev(kept) if len(kept) > 1 else None
        return cls(statistics.fmean(kept), std, len(kept))


@dataclass(frozen=True)
class VariantSummary:
    """A variant's figures over its successful seeds.

    Attributes:
        variant: the variant's name.
        group: the variant's value of the spec's ``group_by`` key (None without grouping).
        runs: number of runs (seeds) of this variant.
        failed: number of those runs that failed.
        final_accuracy: held-out accuracy after the last round.
        best_accuracy: best held-out accuracy over all evaluated rounds (round 0 included).
        final_eval_loss: held-out loss after the last round.
        bytes_up_per_round: bytes uploaded per round (mean over rounds >= 1 of each run).
        bytes_down_per_round: bytes downloaded per round (mean over rounds >= 1).
        rounds_to_threshold: first round whose accuracy is >= the threshold, over the
            seeds that reach it (``reached_threshold`` of them).
        reached_threshold: how many successful seeds reached the threshold.
        agg_error_mean: mean over rounds >= 1 of the strategy's ``agg_error_mean``
            (None when the strategy does not report it).
        seconds: the run's time (sum of the per-round ``seconds``).
        accuracy_curve: per round, ``{"round", "mean", "min", "max", "n"}`` over seeds.

    """

    variant: str
    group: object | None
    runs: int
    failed: int
    final_accuracy: Stat
    best_accuracy: Stat
    final_eval_loss: Stat
    bytes_up_per_round: Stat
    bytes_down_per_round: Stat
    rounds_to_threshold: Stat
    reached_threshold: int
    agg_error_mean: Stat
    seconds: Stat
    accuracy_curve: list[dict[str, float]]

    @property
    def succeeded(self) -> int:
        """Number of runs that finished."""
        return self.runs - self.failed


@dataclass
class ExperimentResult:
    """A sweep's spec, seeds, every run and the per-variant summaries."""

    spec: ExperimentSpec
    seeds: list[int]
    results_dir: Path
    runs: list[RunResult]
    summaries: list[VariantSummary]

    @property
    def failed_runs(self) -> list[RunResult]:
        """The runs that failed, in sweep order."""
        return [r for r in self.runs if not r.ok]

    def summary(self, variant: str) -> VariantSummary:
        """The summary of the variant named ``variant``.

        Raises:
            KeyError: no such variant.

        """
        for s in self.summaries:
            if s.variant == variant:
                return s
        raise KeyError(f"no variant '{variant}'; variants: {[s.variant for s in self.summaries]}")

    def runs_of(self, variant: str) -> list[RunResult]:
        """The variant's runs, in seed order."""
        return [r for r in self.runs if r.variant == variant]

    def groups(self) -> dict[object | None, list[VariantSummary]]:
        """Summaries per ``group_by`` value, in the order the variants are declared.

        Without ``group_by`` there is one group, keyed None.
        """
        groups: dict[object | None, list[VariantSummary]] = {}
        for s in self.summaries:
            groups.setdefault(s.group, []).append(s)
        return groups

    def to_dict(self) -> dict[str, Any]:
        """The content of ``results.json``."""
        return {
            "experiment": self.spec.to_dict(),
            "seeds": list(self.seeds),
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "summaries": [dataclasses.asdict(s) for s in self.summaries],
            "runs": [dataclasses.asdict(r) for r in self.runs],
        }

    def save(self) -> Path:
        """Write ``results.json`` into the results folder (atomically)."""
        path = self.results_dir / RESULTS_FILE
        write_atomic(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, results_dir: str | Path) -> ExperimentResult:
        """Read a sweep back from its ``results.json`` (summaries are recomputed)."""
        results_dir = Path(results_dir)
        data = json.loads((results_dir / RESULTS_FILE).read_text(encoding="utf-8"))
        spec = ExperimentSpec.from_dict(data["experiment"])
        runs = [RunResult(**r) for r in data["runs"]]
        return cls(spec, list(data["seeds"]), results_dir, runs, summarise(spec, runs))


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def metric_curve(runs: Sequence[RunResult], key: str) -> list[dict[str, float]]:
    """Per round, the mean, min and max of ``key`` over the successful runs that have it.

    Returns:
        ``[{"round": r, "mean": ..., "min": ..., "max": ..., "n": k}, ...]`` by round.

    """
    per_round: dict[int, list[float]] = {}
    for run in runs:
        if not run.ok:
            continue
        for record in run.records:
            value = record.get(key)
            if value is not None and math.isfinite(float(value)):
                per_round.setdefault(int(record["round"]), []).append(float(value))
    return [{"round": r, "mean": statistics.fmean(v), "min": min(v), "max": max(v),
             "n": len(v)} for r, v in sorted(per_round.items())]


def _last_value(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The value of ``key`` in the last record that has it."""
    for record in reversed(records):
        if record.get(key) is not None:
            return float(record[key])
    return None


def _values(records: Sequence[Mapping[str, Any]], key: str, first_round: int = 0) -> list[float]:
    return [float(r[key]) for r in records
            if r.get(key) is not None and int(r["round"]) >= first_round]


def _mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def rounds_to_threshold(records: Sequence[Mapping[str, Any]], threshold: float,
                        key: str = "eval_accuracy") -> int | None:
    """The first round whose score ``key`` is at least ``threshold`` (None if never)."""
    for record in records:
        accuracy = record.get(key)
        if accuracy is not None and accuracy >= threshold:
            return int(record["round"])
    return None


def summarise_variant(spec: ExperimentSpec, variant: Variant,
                      runs: Sequence[RunResult]) -> VariantSummary:
    """The variant's summary over its successful runs (see :class:`VariantSummary`)."""
    ok = [r.records for r in runs if r.ok]
    key = spec.score_key
    reached = [n for n in (rounds_to_threshold(rec, spec.threshold, key) for rec in ok)
               if n is not None]
    return VariantSummary(
        variant=variant.name,
        group=spec.group_of(variant),
        runs=len(runs),
        failed=sum(not r.ok for r in runs),
        final_accuracy=Stat.of(_last_value(rec, key) for rec in ok),
        best_accuracy=Stat.of(max(_values(rec, key), default=None) for rec in ok),
        final_eval_loss=Stat.of(_last_value(rec, "eval_loss") for rec in ok),
        bytes_up_per_round=Stat.of(_mean_or_none(_values(rec, "bytes_up", 1)) for rec in ok),
        bytes_down_per_round=Stat.of(_mean_or_none(_values(rec, "bytes_down", 1)) for rec in ok),
        rounds_to_threshold=Stat.of(reached),
        reached_threshold=len(reached),
        agg_error_mean=Stat.of(_mean_or_none(_values(rec, "agg_error_mean", 1)) for rec in ok),
        seconds=Stat.of(sum(_values(rec, "seconds")) for rec in ok),
        accuracy_curve=metric_curve(runs, key),
    )


def summarise(spec: ExperimentSpec, runs: Sequence[RunResult]) -> list[VariantSummary]:
    """One summary per variant, in declaration order."""
    return [summarise_variant(spec, v, [r for r in runs if r.variant == v.name])
            for v in spec.variants]


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def run_dir_for(results_dir: Path, variant: Variant, seed: int) -> Path:
    """The folder of one run: ``<results_dir>/runs/<variant>-seed<seed>``."""
    return results_dir / "runs" / f"{variant.name}-seed{seed}"




def _canonical(config: Mapping[str, object]) -> str:
    """The config as comparable text; ``results-dir`` as an absolute path.

    The same sweep folder given once as ``results/x`` and once as ``/abs/.../results/x``
    names the same runs, which must be reused, not run again.
    """
    values = {k: str(v) for k, v in config.items()}
    if "results-dir" in values:
        values["results-dir"] = str(Path(values["results-dir"]).expanduser().resolve())
    return json.dumps(values, sort_keys=True)


def _expected_rounds(config: Mapping[str, object]) -> int:
    """The run's ``num-rounds``: from its config, else the settings' default."""
    if "num-rounds" in config:
        return int(float(str(config["num-rounds"])))
    from task.run_settings import FederationSettings

    return FederationSettings().num_rounds


def completed_records(run_dir: Path, config: Mapping[str, object]) -> list[dict[str, Any]] | None:
    """The records of a finished earlier run of ``config`` in ``run_dir``, else None.

    A run counts as finished when its ``metrics.json`` reaches the last round and, if the
    runner marked the folder, the marked run config equals ``config`` (a run of changed
    settings is not reused).
    """
    metrics = run_dir / "metrics.json"
    try:
        records = json.loads(metrics.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(records, list) or not records:
        return None
    if records[-1].get("round") != _expected_rounds(config):
        return None
    marker = run_dir / RUN_MARKER
    if marker.exists():
        try:
            marked = json.loads(marker.read_text(encoding="utf-8")).get("run_config", {})
        except (OSError, ValueError, AttributeError):
            return None
        if _canonical(marked) != _canonical(config):
            return None
    return records


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _final_score_text(records: Sequence[Mapping[str, Any]], key: str) -> str:
    score = _last_value(records, key)
    return "" if score is None else f"; final {key.removeprefix('eval_')} {score:.4f}"


def _execute_run(
    simulate_fn: SimulateFn, config: dict[str, object], run_dir: Path, variant: str, seed: int,
    num_clients: int, simulate_options: Mapping[str, Any],
) -> RunResult:
    """Run one simulation; a failure is returned as a :class:`RunResult` with its error."""
    (run_dir / RUN_MARKER).unlink(missing_ok=True)  # marks only runs that finish
    started = time.monotonic()
    try:
        records = simulate_fn(dict(config), num_clients=num_clients, **simulate_options)
    except Exception as exc:  # noqa: BLE001 - one failed run must not end the sweep
        error = f"{type(exc).__name__}: {exc}"
        write_atomic(run_dir / ERROR_FILE, traceback.format_exc())
        return RunResult(variant, seed, str(run_dir), [], error,
                         wall_seconds=time.monotonic() - started)
    wall = time.monotonic() - started
    if not records:
        return RunResult(variant, seed, str(run_dir), [], "RuntimeError: the run returned "
                         "no records", wall_seconds=wall)
    write_atomic(run_dir / RUN_MARKER, json.dumps(
        {"run_config": {k: str(v) for k, v in config.items()}, "wall_seconds": wall},
        indent=2) + "\n")
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    return RunResult(variant, seed, str(run_dir), list(records), wall_seconds=wall)


def run_experiment(
    spec: ExperimentSpec,
    *,
    seeds: Sequence[int],
    results_dir: Path,
    simulate_fn: SimulateFn | None = None,
    resume: bool = True,
    simulate_options: Mapping[str, Any] | None = None,
) -> ExperimentResult:
    """Run every variant with every seed and summarise; writes ``results.json``.

    Each run calls ``simulate_fn(run_config, num_clients=spec.num_clients,
    **simulate_options)`` with the run config of :meth:`ExperimentSpec.run_config`
    (results in ``<results_dir>/runs/<variant>-seed<seed>``). ``results.json`` is
    rewritten after every run, so an interrupted sweep leaves its progress behind.

    Args:
        spec: the experiment.
        seeds: the seeds; every variant runs once per seed.
        results_dir: the experiment's results folder.
        simulate_fn: runs one simulation and returns its per-round records;
            default :func:`simulations.simulate.simulate`.
        resume: reuse runs whose folder already holds their finished metrics.
        simulate_options: extra keyword arguments for ``simulate_fn`` (for the default,
            ``cpus_per_client`` and ``gpus_per_client``).

    Returns:
        The runs (failed ones carry their error) and the per-variant summaries.

    Raises:
        ValueError: no seeds, or duplicate seeds.

    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if simulate_fn is None:
        from simulations.simulate import simulate

        simulate_fn = spec.hook("simulate") or simulate
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    plan = [(v, s) for v in spec.variants for i, s in enumerate(seeds)
            if v.max_seeds is None or i < v.max_seeds]
    runs: list[RunResult] = []
    started = time.monotonic()
    executed = 0.0
    for i, (variant, seed) in enumerate(plan, start=1):
        run_dir = run_dir_for(results_dir, variant, seed)
        config = spec.run_config(variant, seed, run_dir)
        head = f"[{i}/{len(plan)}] {spec.name}: {variant.name} seed {seed}"
        records = completed_records(run_dir, config) if resume else None
        if records is not None:
            runs.append(RunResult(variant.name, seed, str(run_dir), records, reused=True))
            score = _final_score_text(records, spec.score_key)
            print(f"{head}: reused the finished run in {run_dir}{score}",
                  flush=True)
        else:
            print(f"{head}: running (elapsed {_format_duration(time.monotonic() - started)})",
                  flush=True)
            run = _execute_run(simulate_fn, config, run_dir, variant.name, seed,
                               spec.num_clients, simulate_options or {})
            runs.append(run)
            executed += 1
            print(_run_done_text(head, run, started, executed, len(plan) - i,
                                 spec.score_key), flush=True)
        ExperimentResult(spec, seeds, results_dir, runs, summarise(spec, runs)).save()
    result = ExperimentResult(spec, seeds, results_dir, runs, summarise(spec, runs))
    result.save()
    failed = len(result.failed_runs)
    print(f"{spec.name}: {len(plan)} runs ({sum(r.reused for r in runs)} reused, {failed} failed) "
          f"in {_format_duration(time.monotonic() - started)}; {results_dir / RESULTS_FILE}",
          flush=True)
    return result


def _run_done_text(head: str, run: RunResult, started: float, executed: float,
                   remaining: int, score_key: str = "eval_accuracy") -> str:
    elapsed = time.monotonic() - started
    if run.ok:
        score = _final_score_text(run.records, score_key)
        text = f"{head}: done in {run.wall_seconds or 0:.1f} s{score}"
    else:
        text = f"{head}: FAILED after {run.wall_seconds or 0:.1f} s: {run.error}"
    text += f" (elapsed {_format_duration(elapsed)}"
    if remaining:
        text += f", about {_format_duration(elapsed / executed * remaining)} left"
    return text + ")"
