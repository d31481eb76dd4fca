"""The report of an experiment sweep: ``report.md`` with summary tables, and plots.

Plots use matplotlib's Agg backend (no display needed); matplotlib is imported only when
a plot is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.experiment import ExperimentResult, Stat, VariantSummary, metric_curve

REPORT_FILE = "report.md"
ACCURACY_PLOT = "accuracy.png"
LOSS_PLOT = "eval_loss.png"
AGG_ERROR_PLOT = "aggregation_error.png"


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def format_stat(stat: Stat, spec: str = ".3f", scale: float = 1.0) -> str:
    """``mean ± std`` (``mean`` alone for one value, ``—`` for none), e.g. ``0.953 ± 0.004``."""
    if stat.mean is None:
        return "—"
    text = format(stat.mean * scale, spec)
    if stat.std is not None:
        text += f" ± {format(stat.std * scale, spec)}"
    return text


def format_bytes(stat: Stat) -> str:
    """A byte count (mean ± std over seeds; std left out when 0) in B, kB or MB (SI units)."""
    mean = stat.mean
    if mean is None:
        return "—"
    if not stat.std:  # the same size for every seed (the usual case): no "± 0"
        stat = Stat(stat.mean, None, stat.n)
    for unit, size, spec in (("MB", 1e6, ".2f"), ("kB", 1e3, ".1f")):
        if mean >= size:
            return f"{format_stat(stat, spec, 1 / size)} {unit}"
    return f"{format_stat(stat, '.0f')} B"


def format_rounds(summary: VariantSummary) -> str:
    """Rounds to the threshold over the seeds that reach it, with how many did."""
    reached = f"({summary.reached_threshold}/{summary.succeeded})"
    if summary.reached_threshold == 0:
        return f"never {reached}"
    return f"{format_stat(summary.rounds_to_threshold, '.1f')} {reached}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_table(summaries: Sequence[VariantSummary], threshold: float,
                  score: str = "accuracy") -> str:
    """A markdown table with one row per variant (see :class:`VariantSummary`).

    ``score``: the name of the task's score (the "accuracy" fields of the summaries).
    """
    header = ["variant", f"final {score}", f"best {score}", f"rounds to ≥ {threshold:g}",
              "upload / round", "download / round", "aggregation error", "final eval loss",
              "runs ok"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        row = [f"`{s.variant}`", format_stat(s.final_accuracy), format_stat(s.best_accuracy),
               format_rounds(s), format_bytes(s.bytes_up_per_round),
               format_bytes(s.bytes_down_per_round), format_stat(s.agg_error_mean, ".2e"),
               format_stat(s.final_eval_loss),
               f"{s.succeeded}/{s.runs}"]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _config_text(config: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items()) or "(base settings)"


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _group_title(result: ExperimentResult, group: object | None) -> str:
    return "" if result.spec.group_by is None else f"{result.spec.group_by} = {group}"


def _log_floor(curves: Sequence[list[dict[str, float]]]) -> float:
    """A floor for non-positive values on a log axis: a decade below the smallest positive."""
    positive = [p[k] for c in curves for p in c for k in ("mean", "min", "max") if p[k] > 0]
    return min(positive) / 10 if positive else 1e-12


def plot_metric(result: ExperimentResult, key: str, path: str | Path, ylabel: str,
                log: bool = False, title: str = "") -> Path:
    """A per-round metric: one line per variant (mean over seeds), shaded min-max band.

    One subplot per ``group_by`` value when the spec groups its variants. On a log axis,
    values <= 0 (e.g. an exactly zero aggregation error) are drawn at a floor a decade
    below the smallest positive value, and a note says so.

    Args:
        result: the sweep.
        key: a per-round record key, e.g. ``"eval_accuracy"`` or ``"agg_error_mean"``.
        path: the PNG to write.
        ylabel: the y-axis label.
        log: log-scale y axis.
        title: the figure title (default: the experiment's name).

    Raises:
        ValueError: no successful run has ``key`` in any round.

    """
    curves = {s.variant: metric_curve(result.runs_of(s.variant), key) for s in result.summaries}
    if not any(curves.values()):
        raise ValueError(f"no run of '{result.spec.name}' has per-round '{key}'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = result.groups()
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False,
                             sharey=True)
    floor = _log_floor(list(curves.values())) if log else None
    clamped = False
    for ax, (group, summaries) in zip(axes[0], groups.items(), strict=True):
        for s in summaries:
            clamped |= _draw_curve(ax, curves[s.variant], s.variant, floor)
        ax.set_title(_group_title(result, group))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
        if any(curves[s.variant] for s in summaries):
            ax.legend(fontsize="small")
    axes[0][0].set_ylabel(ylabel)
    if clamped and floor is not None:
        for ax in axes[0]:
            ax.axhline(floor, color="grey", linestyle=":", linewidth=0.8)
        fig.text(0.01, 0.01, f"values ≤ 0 (e.g. exactly 0) are plotted at {floor:.0e} (dotted)",
                 fontsize="small", color="grey")
    seeds = ", ".join(str(s) for s in result.seeds)
    fig.suptitle(title or f"{result.spec.name}: mean over seeds {seeds} (band: min-max)")
    fig.tight_layout(rect=(0, 0.04 if clamped else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _draw_curve(ax: Any, curve: list[dict[str, float]], label: str,
                floor: float | None) -> bool:
    """Draw one variant's mean line and min-max band; True if a value was raised to floor."""
    if not curve:
        return False
    rounds = [p["round"] for p in curve]
    mean, low, high = ([p[k] for p in curve] for k in ("mean", "min", "max"))
    clamped = False
    if floor is not None:
        clamped = any(v <= 0 for v in mean + low + high)
        mean, low, high = ([max(v, floor) for v in seq] for seq in (mean, low, high))
    (line,) = ax.plot(rounds, mean, "o-", markersize=3, label=label)
    ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return clamped


def _has_key(result: ExperimentResult, key: str) -> bool:
    return any(r.get(key) is not None for run in result.runs if run.ok for r in run.records)


def write_plots(result: ExperimentResult) -> list[Path]:
    """Write the standard plots into the results folder; returns their paths.

    ``accuracy.png`` (``eval_loss.png`` when no run reports accuracy), and
    ``aggregation_error.png`` when any run reports ``agg_error_mean``.
    """
    out = result.results_dir
    paths: list[Path] = []
    key = result.spec.score_key
    if _has_key(result, key):
        paths.append(plot_metric(result, key, out / ACCURACY_PLOT,
                                 f"held-out {key.removeprefix('eval_').replace('_', ' ')}"))
    elif _has_key(result, "eval_loss"):
        paths.append(plot_metric(result, "eval_loss", out / LOSS_PLOT, "held-out loss"))
    if _has_key(result, "agg_error_mean"):
        paths.append(plot_metric(result, "agg_error_mean", out / AGG_ERROR_PLOT,
                                 "aggregation error (mean over modules)", log=True))
    return paths


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _settings_section(result: ExperimentResult) -> list[str]:
    spec = result.spec
    reused = sum(r.reused for r in result.runs)
    lines = ["## Settings", "",
             f"{spec.num_clients} clients per run; seeds {', '.join(map(str, result.seeds))}; "
             f"{len(result.runs)} runs ({reused} reused from an earlier sweep, "
             f"{len(result.failed_runs)} failed); threshold {spec.score_key.removeprefix('eval_')} "
             f"{spec.threshold:g}.", "",
             "Base settings (every run; the defaults of `fedlora simulate` for the rest):", ""]
    if spec.base_config:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| `{_cell(k)}` | `{_cell(v)}` |" for k, v in spec.base_config.items()]
    else:
        lines.append("(none: the defaults)")
    lines += ["", "Variants:", "", "| variant | settings |", "|---|---|"]
    lines += [f"| `{_cell(v.name)}` | `{_cell(_config_text(v.run_config))}` |"
              for v in spec.variants]
    return lines + [""]


def _results_section(result: ExperimentResult) -> list[str]:
    lines = ["## Results", ""]
    for group, summaries in result.groups().items():
        if result.spec.group_by is not None:
            lines += [f"### {_group_title(result, group)}", ""]
        lines += [summary_table(summaries, result.spec.threshold,
                                result.spec.score_key.removeprefix("eval_")), ""]
    lines += [
        "Mean ± sample standard deviation over the seeds whose run finished. Final = after "
        "the last round; best = best evaluated round (round 0 = before training included); "
        f"rounds to ≥ {result.spec.threshold:g}: first round whose held-out "
        f"{result.spec.score_key.removeprefix('eval_')} reaches "
        "it, averaged over the seeds that reach it (how many did, of the finished runs); "
        "upload / round: bytes all clients sent per round (rounds ≥ 1); aggregation error: "
        "the strategy's mean relative error ‖aggregate − exact‖ / ‖exact‖ over modules, "
        "averaged over rounds ≥ 1 (— when the strategy does not report it).", ""]
    return lines


def gains_table(result: ExperimentResult) -> str:
    """A markdown table of each ``gain_keys`` score at round 0, the last round, and the gain.

    One row per variant and score: mean ± sample standard deviation over the finished
    seeds of the score before training (round 0), after the last round, and their
    difference (computed per seed).
    """
    lines = ["| variant | score | round 0 | last round | gain |", "|---|---|---|---|---|"]
    for variant in result.spec.variants:
        runs = [r for r in result.runs if r.ok and r.variant == variant.name]
        for key in result.spec.gain_keys:
            pairs = [(_round_value(r.records, 0, key), _last(r.records, key)) for r in runs]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            cells = [Stat.of(a for a, _ in pairs), Stat.of(b for _, b in pairs),
                     Stat.of(b - a for a, b in pairs)]
            lines.append(f"| `{_cell(variant.name)}` | `{key.removeprefix('eval_')}` | "
                         + " | ".join(format_stat(c) for c in cells) + " |")
    return "\n".join(lines)


def _round_value(records: Sequence[dict[str, Any]], server_round: int, key: str) -> float | None:
    for record in records:
        if int(record["round"]) == server_round and record.get(key) is not None:
            return float(record[key])
    return None


def _last(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in records if r.get(key) is not None]
    return values[-1] if values else None


def _gains_section(result: ExperimentResult) -> list[str]:
    if not result.spec.gain_keys:
        return []
    return ["## From round 0 to the last round", "", gains_table(result), "",
            "Round 0 scores the initial adapter (the base model before any training: "
            "zero-shot); mean ± sample standard deviation over the finished seeds.", ""]


def _failures_section(result: ExperimentResult) -> list[str]:
    failed = result.failed_runs
    if not failed:
        return []
    lines = ["## Failed runs", "",
             f"{len(failed)} run(s) failed; they are left out of the summaries above.", ""]
    for run in failed:
        trace = Path(run.run_dir) / "error.txt"
        where = f" (traceback: `{_relative(trace, result.results_dir)}`)" if trace.exists() else ""
        lines.append(f"- `{run.variant}` seed {run.seed}: {_cell(run.error)}{where}")
    return lines + [""]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _plots_section(result: ExperimentResult, plots: Sequence[Path]) -> list[str]:
    if not plots:
        return ["## Plots", "", "(no finished run to plot)", ""]
    lines = ["## Plots", ""]
    for path in plots:
        name = path.stem.replace("_", " ")
        lines += [f"![{name}]({path.name})", ""]
    lines += ["Per-run folders (metrics, details, checkpoints): `runs/`; "
              "all records and summaries: `results.json`.", ""]
    return lines


def render_report(result: ExperimentResult, plots: Sequence[Path] = (),
                  command: str | None = None) -> str:
    """The markdown text of ``report.md``."""
    lines = [f"# Experiment `{result.spec.name}`", "", result.spec.description.strip(), ""]
    if command:
        lines += ["Reproduce (finished runs in the results folder are reused):", "",
                  "```bash", command, "```", ""]
    lines += _settings_section(result)
    lines += _results_section(result)
    lines += _gains_section(result)
    extra = result.spec.hook("report_sections")
    if extra is not None:
        lines += extra(result)
    lines += _failures_section(result)
    lines += _plots_section(result, plots)
    return "\n".join(lines)


def write_report(result: ExperimentResult, *, command: str | None = None) -> Path:
    """Write ``report.md`` and the plots into the results folder; returns the report's path.

    Args:
        result: the sweep.
        command: the command line that reproduces the sweep, shown in the report.

    """
    plots = write_plots(result)
    extra_plots = result.spec.hook("write_plots")
    if extra_plots is not None:
        plots += extra_plots(result)
    path = result.results_dir / REPORT_FILE
    path.write_text(render_report(result, plots, command), encoding="utf-8")
    return path
