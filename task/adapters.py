"""Moving adapters between a peft model and the :class:`~strategies.LoraAdapter` structure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from strategies.adapter import LoraAdapter

if TYPE_CHECKING:
    from peft import PeftModel


def get_adapter(model: PeftModel, alpha: float) -> LoraAdapter:
    """A copy of the model's trainable adapter state (LoRA factors and ``modules_to_save``).

    The arrays never alias the model's parameters, so later training does not change them.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return LoraAdapter.from_state_dict(
        {k: v.detach().to("cpu", dtype=torch.float32, copy=True).numpy() for k, v in state.items()},
        alpha,
    )


def set_adapter(model: PeftModel, adapter: LoraAdapter) -> None:
    """Load ``adapter`` into the model, asserting every adapter parameter is set.

    Raises:
        ValueError: the adapter's keys differ from the model's adapter keys, or a shape
            does not match.

    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    state = adapter.to_state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapter does not fit the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key}: shape {value.shape} != model's {tuple(expected[key].shape)}")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"peft did not accept adapter keys: {unexpected[:3]}")
