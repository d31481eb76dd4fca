"""``exact-aggregation``: FedIT against the exact rules (FFA-LoRA, FLoRA, FedEx-LoRA) and FeDeRA."""

from __future__ import annotations

from simulations.experiment import ExperimentSpec
from simulations.experiments import register_experiment
from simulations.experiments.exactness import dirichlet_sweep

STRATEGIES = {
    "fedit": {"strategy": "fedit"},
    "ffa-lora": {"strategy": "ffa-lora", "lora-alpha": 64.0},
    "flora": {"strategy": "flora"},
    "fedex-lora": {"strategy": "fedex-lora"},
    "federa": {"strategy": "federa"},
}


@register_experiment("exact-aggregation")
def exact_aggregation() -> ExperimentSpec:
    """Exact aggregation rules and an SVD start against FedIT, Dirichlet 0.1 and 1.0."""
    return dirichlet_sweep(
        name="exact-aggregation",
        description=(
            "Exact aggregation against FedIT on the embedded default (MiniLM-L6, BBC News, "
            "4 clients, 5 rounds of 8 local steps, 64 tokens, rank 8), with label-skewed "
            "partitions (Dirichlet 0.1) and milder ones (1.0); the base settings are those of "
            "the exactness experiment, so FedIT and FFA-LoRA repeat its runs. FedIT averages A "
            "and B (inexact); FFA-LoRA freezes a shared A (exact; alpha 64); FLoRA stacks the "
            "clients' factors, merges the stack into the base weights and restarts from a "
            "fresh adapter every round (exact, any ranks); FedEx-LoRA averages like FedIT and "
            "folds the residual avg(sBA) - s avg(B) avg(A) into the base weights (exact); "
            "FeDeRA starts LoRA from the SVD of the pretrained weights (residual in the base) "
            "and then averages like FedIT. The last three change the clients' base weights, "
            "which travel down as dense deltas: compare the download column."
        ),
        strategies=STRATEGIES,
    )
