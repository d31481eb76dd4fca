"""``hetero-ranks``: FedIT at the minimum and maximum rank vs HetLoRA and FlexLoRA."""

from __future__ import annotations

from simulations.experiment import ExperimentSpec, Variant
from simulations.experiments import register_experiment

HETERO = {"lora-rank": 16, "lora-alpha": 32.0, "rank-distribution": "heavy-tail",
          "rank-choices": "2,4,8,16"}


@register_experiment("hetero-ranks")
def hetero_ranks() -> ExperimentSpec:
    """Heavy-tail client ranks {2, 4, 8, 16}: who gains from the strong clients."""
    return ExperimentSpec(
        name="hetero-ranks",
        description=(
            "Heterogeneous client ranks on the embedded default (MiniLM-L6, BBC News, "
            "Dirichlet 0.5, 4 clients, 6 rounds of 10 local steps, 64 tokens). Client ranks "
            "are drawn from {2, 4, 8, 16} with a heavy tail (P ~ 1/i^2: most clients at 2). "
            "Baselines: FedIT with every client at the minimum rank 2 (what a federation "
            "forced to the weakest client gets) and at the maximum rank 16 (unattainable "
            "when clients cannot afford it). Every variant uses the same LoRA scale "
            "alpha / r = 2."
        ),
        variants=[
            Variant("fedit-r2", {"strategy": "fedit", "lora-rank": 2, "lora-alpha": 4.0}),
            Variant("fedit-r16", {"strategy": "fedit", "lora-rank": 16, "lora-alpha": 32.0}),
            Variant("hetlora", {"strategy": "hetlora", **HETERO}),
            Variant("flexlora", {"strategy": "flexlora", **HETERO}),
            Variant("flexlora-sqrt", {"strategy": "flexlora", "flexlora-split": "sqrt",
                                      **HETERO}),
        ],
        num_clients=4,
        base_config={"num-rounds": 6, "local-steps": 10, "max-length": 64,
                     "keep-checkpoints": 0, "eval-batch-size": 128},
        threshold=0.8,
    )
