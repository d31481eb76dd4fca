"""Named experiments for ``fedlora experiment NAME``.

An experiment is a function returning an :class:`~simulations.experiment.ExperimentSpec`,
registered under its name with :func:`register_experiment`. Experiments other than the
built-in ``smoke`` live in modules of this package named after them (``-`` written as
``_``: ``hetero-ranks`` -> ``simulations/experiments/hetero_ranks.py``); such a module is
imported the first time its experiment is asked for, and registers itself::

    from simulations.experiment import ExperimentSpec, Variant
    from simulations.experiments import register_experiment

    @register_experiment("hetero-ranks")
    def hetero_ranks() -> ExperimentSpec:
        return ExperimentSpec(name="hetero-ranks", description="...", variants=[...])

Importing this package is cheap (no torch, flwr or matplotlib).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable

from simulations.experiment import ExperimentSpec, Variant

ExperimentFactory = Callable[[], ExperimentSpec]

EXPERIMENTS: dict[str, ExperimentFactory] = {}


def register_experiment(name: str) -> Callable[[ExperimentFactory], ExperimentFactory]:
    """Decorator: make the spec factory available as experiment ``name``.

    Registering the same function again (e.g. when its module is reloaded) is allowed.

    Raises:
        ValueError: another function is already registered under ``name``.

    """

    def decorator(factory: ExperimentFactory) -> ExperimentFactory:
        known = EXPERIMENTS.get(name)
        if known is not None and _qualified(known) != _qualified(factory):
            raise ValueError(f"experiment name '{name}' is already registered by "
                             f"{_qualified(known)}")
        EXPERIMENTS[name] = factory
        return factory

    return decorator


def _qualified(factory: ExperimentFactory) -> str:
    return f"{factory.__module__}.{getattr(factory, '__qualname__', repr(factory))}"


def _module_name(name: str) -> str:
    return f"{__name__}.{name.replace('-', '_')}"


def _import_experiment_module(name: str) -> None:
    """Import the module that registers experiment ``name``, if there is one."""
    module = _module_name(name)
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:  # the module exists but something it imports does not
            raise


def _discover() -> None:
    """Import every experiment module of this package (each registers itself)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def _headline(description: str) -> str:
    """The first sentence of a description (of its first line)."""
    first = (description.strip().splitlines() or [""])[0]
    return re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0]


def available_experiments() -> dict[str, str]:
    """Every experiment's name and the first sentence of its description, sorted by name."""
    _discover()
    return {name: _headline(EXPERIMENTS[name]().description) for name in sorted(EXPERIMENTS)}


def get_experiment(name: str) -> ExperimentSpec:
    """The spec of experiment ``name``, importing its module first if needed.

    Raises:
        ValueError: an unknown name; the message lists the known experiments.

    """
    if name not in EXPERIMENTS and name.replace("-", "_").isidentifier():
        _import_experiment_module(name)
    if name not in EXPERIMENTS:
        known = ", ".join(available_experiments())  # imports every experiment module
        if name not in EXPERIMENTS:  # (a module may define more than one experiment)
            raise ValueError(f"unknown experiment '{name}'; known experiments: {known}")
    return EXPERIMENTS[name]()


@register_experiment("smoke")
def smoke() -> ExperimentSpec:
    """FedIT vs FFA-LoRA on the embedded default, tiny budget: for trying the machinery."""
    return ExperimentSpec(
        name="smoke",
        description="Smoke test of the experiment machinery: FedIT vs FFA-LoRA on the "
        "embedded MiniLM / BBC News default with a tiny budget (2 clients, 2 rounds of "
        "2 local steps, 32 tokens). The numbers mean little; the folder layout, table and "
        "plots are what an experiment produces.",
        variants=[Variant("fedit", {"strategy": "fedit"}),
                  Variant("ffa-lora", {"strategy": "ffa-lora"})],
        num_clients=2,
        base_config={"model": "minilm", "num-rounds": 2, "local-steps": 2, "max-length": 32,
                     "keep-checkpoints": 0},
        threshold=0.5,
        seeds=(0,),
    )


__all__ = [
    "EXPERIMENTS",
    "ExperimentFactory",
    "ExperimentSpec",
    "Variant",
    "available_experiments",
    "get_experiment",
    "register_experiment",
]
