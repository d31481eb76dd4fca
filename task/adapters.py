"""Moving adapters between a peft model and the :class:`~strategies.LoraAdapter` structure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from strategies.adapter import LoraAdapter
from strategies.parts import ALL_PARTS, EXTRAS, LORA_A, LORA_B

if TYPE_CHECKING:
    from peft import PeftModel

DEFAULT_ADAPTER = "default"


def get_adapter(model: PeftModel, alpha: float, adapter_name: str = DEFAULT_ADAPTER) -> LoraAdapter:
    """A copy of one adapter's trainable state (LoRA factors and ``modules_to_save``).

    The arrays never alias the model's parameters, so later training does not change them.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return LoraAdapter.from_state_dict(
        {k: v.detach().to("cpu", dtype=torch.float32, copy=True).numpy() for k, v in state.items()},
        alpha,
    )


def set_adapter(
    model: PeftModel, adapter: LoraAdapter, adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Load ``adapter`` into the named adapter of the model, asserting every parameter is set.

    Raises:
        ValueError: the adapter's keys differ from the model's adapter keys, or a shape
            does not match.

    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = adapter.to_state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapter does not fit the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key}: shape {value.shape} != model's {tuple(expected[key].shape)}")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"peft did not accept adapter keys: {unexpected[:3]}")


def parameter_part(name: str, adapter_name: str) -> str | None:
    """The adapter part of a model parameter (``None`` if it is not in that adapter)."""
    if f".lora_A.{adapter_name}." in name:
        return LORA_A
    if f".lora_B.{adapter_name}." in name:
        return LORA_B
    if f"modules_to_save.{adapter_name}." in name:
        return EXTRAS
    return None


def set_trainable_parts(
    model: PeftModel, parts: Iterable[str], adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Train exactly ``parts`` of the named adapter; everything else is frozen."""
    wanted = set(parts)
    unknown = wanted - ALL_PARTS
    if unknown:
        raise ValueError(f"unknown adapter parts {sorted(unknown)}")
    for name, param in model.named_parameters():
        part = parameter_part(name, adapter_name)
        param.requires_grad_(part is not None and part in wanted)
