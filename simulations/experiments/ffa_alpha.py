"""``ffa-alpha``: FFA-LoRA's alpha, which scales B's step like a learning rate."""

from __future__ import annotations

from simulations.experiment import ExperimentSpec, Variant
from simulations.experiments import register_experiment


@register_experiment("ffa-alpha")
def ffa_alpha() -> ExperimentSpec:
    """FFA-LoRA's alpha (its scale multiplies B's step like a learning rate)."""
    return ExperimentSpec(
        name="ffa-alpha",
        description=(
            "FFA-LoRA with alpha 16, 64 and 256 (scale 2, 8, 32 at rank 8) against FedIT at "
            "alpha 16, on the embedded default (Dirichlet 0.5, 4 clients, 6 rounds of 10 "
            "local steps, 64 tokens): picks the recommended FFA-LoRA setting."
        ),
        variants=[Variant("fedit-a16", {"strategy": "fedit"})]
        + [Variant(f"ffa-a{a}", {"strategy": "ffa-lora", "lora-alpha": float(a)})
           for a in (16, 64, 256)],
        num_clients=4,
        base_config={"num-rounds": 6, "local-steps": 10, "max-length": 64,
                     "keep-checkpoints": 0, "eval-batch-size": 128},
        threshold=0.8,
        seeds=(0,),
    )
