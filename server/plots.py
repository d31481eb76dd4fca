"""Plots of a run's metrics (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_metrics(records: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy (or perplexity) and loss per round, side by side, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_score, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    score_key = "eval_accuracy" if any(r.get("eval_accuracy") is not None for r in records) \
        else "eval_perplexity"
    evaluated = [r for r in records if r.get(score_key) is not None]
    ax_score.plot([r["round"] for r in evaluated], [r[score_key] for r in evaluated], "o-")
    ax_score.set_xlabel("round")
    ax_score.set_ylabel(score_key.replace("eval_", "held-out "))
    ax_score.grid(alpha=0.3)
    ax_loss.plot([r["round"] for r in evaluated], [r["eval_loss"] for r in evaluated], "o-",
                 label="held-out loss")
    trained = [r for r in records if r.get("train_loss") is not None]
    ax_loss.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], "s--",
                 label="client train loss")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
