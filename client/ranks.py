"""Client-side rank handling: a node's own rank budget, and received factors fitted to it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from strategies.instructions import ClientInstructions
from strategies.parts import LORA_A, LORA_B, part_of

if TYPE_CHECKING:

    pass

BUDGET_KEY = "max-lora-rank"


def apply_rank_budget(
    instructions: ClientInstructions, node_config: Mapping[str, Any]
) -> ClientInstructions:
    """Lower the instructed rank to the node's declared budget (``max-lora-rank``).

    Alpha is lowered in proportion, so the adapter's scale (alpha / rank) is unchanged.
    """
    if BUDGET_KEY not in node_config:
        return instructions
    return lower_rank(instructions, int(node_config[BUDGET_KEY]))


def lower_rank(instructions: ClientInstructions, budget: int) -> ClientInstructions:
    """The instructions with their rank lowered to ``budget`` (alpha in proportion)."""
    if budget < 1:
        raise ValueError(f"node config {BUDGET_KEY} must be at least 1, got {budget}")
    if budget >= instructions.rank:
        return instructions
    return dataclasses.replace(instructions, rank=budget,
                               alpha=instructions.alpha * budget / instructions.rank)


def fit_rank(state: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Truncate received factors whose rank exceeds ``rank`` (after a budget cut).

    Works on partial states too (only A or only B of a module).
    """
    fitted = {}
    for key, value in state.items():
        part = part_of(key)
        if part == LORA_A and value.shape[0] > rank:
            value = value[:rank]
        elif part == LORA_B and value.shape[1] > rank:
            value = value[:, :rank]
        fitted[key] = value
    return fitted
