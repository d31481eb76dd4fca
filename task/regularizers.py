"""Training penalties on adapter parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from strategies.hetlora_math import kept_rank

if TYPE_CHECKING:
    from peft import PeftModel


def lora_factor_pairs(
    model: PeftModel, adapter_name: str
) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """``(A, B)`` weight pairs of every LoRA layer of one adapter."""
    pairs = []
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter_name in lora_a:
            pairs.append((lora_a[adapter_name].weight, lora_b[adapter_name].weight))
    return pairs


def self_pruning_penalty(model: PeftModel, adapter_name: str, gamma: float) -> torch.Tensor:
    """HetLoRA's rank self-pruning term ``sum_m ||B_m tail|| ||A_m tail||`` (unweighted).

    The tail is the last ``1 - gamma`` share of the rank (indices from
    ``kept_rank(r, gamma)`` on), the part a client may later prune.
    """
    total = torch.zeros(())
    for a, b in lora_factor_pairs(model, adapter_name):
        keep = kept_rank(a.shape[0], gamma)
        if keep < a.shape[0]:
            total = total.to(a.device) + a[keep:].norm() * b[:, keep:].norm()
    return total
