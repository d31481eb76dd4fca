"""``smollm2-bbc``: the embedded LLM default (the ``smollm2-bbc`` preset) over seeds."""

from __future__ import annotations

from simulations.experiment import ExperimentSpec, Variant
from simulations.experiments import register_experiment
from simulations.presets import SMOLLM2_BBC


@register_experiment("smollm2-bbc")
def smollm2_bbc() -> ExperimentSpec:
    """The LLM preset with several seeds: zero-shot against federated, per kind of answer."""
    base = {k: v for k, v in SMOLLM2_BBC.run_config.items() if k != "results-dir"}
    return ExperimentSpec(
        name="smollm2-bbc",
        description=(
            "SmolLM2-135M-Instruct on BBC News instructions (the `smollm2-bbc` preset: 2 "
            "clients, FedIT, response-only loss): generated-topic exact match and headline "
            "ROUGE-L before training (round 0, zero-shot) and after the federated rounds."
        ),
        variants=[Variant("fedit", {"strategy": "fedit"})],
        num_clients=SMOLLM2_BBC.num_clients,
        base_config=base,
        threshold=0.9,
        seeds=(0, 1, 2),
        gain_keys=("eval_topic_exact_match", "eval_headline_rouge_l", "eval_rouge_l",
                   "eval_perplexity"),
    )
