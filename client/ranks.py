"""Client-side rank handling: a node's own rank budget and HetLoRA's self-pruning."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from strategies.adapter import LoraAdapter
from strategies.hetlora_math import pruned_rank, truncate_adapter
from strategies.instructions import ClientInstructions
from strategies.parts import LORA_A, LORA_B, part_of

if TYPE_CHECKING:
    import torch

    from task.runtime import TaskRuntime

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


def pruning_penalty(
    runtime: TaskRuntime, instructions: ClientInstructions
) -> Callable[[], torch.Tensor] | None:
    """HetLoRA's regulariser ``lambda * sum ||B_tail|| ||A_tail||``, if instructed."""
    from task.regularizers import self_pruning_penalty

    strength = float(instructions.options.get("prune-lambda", 0.0))
    if strength <= 0:
        return None
    gamma = float(instructions.options["prune-gamma"])
    return lambda: strength * self_pruning_penalty(runtime.model, runtime.active, gamma)


def prune(adapter: LoraAdapter, instructions: ClientInstructions) -> LoraAdapter:
    """Shrink the adapter's rank when every module's tail is small (HetLoRA), else keep it.

    The adapter keeps its scale: alpha shrinks with the rank.
    """
    if "prune-gamma" not in instructions.options or adapter.max_rank < 2:
        return adapter
    gamma = float(instructions.options["prune-gamma"])
    threshold = float(instructions.options["prune-threshold"])
    new_rank = max(pruned_rank(f, gamma, threshold) for f in adapter.modules.values())
    if new_rank >= adapter.max_rank:
        return adapter
    truncated = truncate_adapter(adapter, new_rank)
    return LoraAdapter(truncated.modules, adapter.alpha * new_rank / adapter.max_rank,
                       truncated.extras)
