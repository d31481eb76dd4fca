"""Deltas on the base weights adapted by LoRA: applying them, and training the sparse ones.

The base weight of every LoRA-adapted layer can carry a sparse delta on a fixed mask
(SLoRA's first stage) or a dense one (a change a strategy folds into the frozen
base): see :mod:`strategies.sparse`. The original weights are kept so that a reused
model is reset exactly before each round; only sparse deltas are ever trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from strategies.sparse import (
    dense_key,
    is_base_key,
    is_dense_key,
    module_of,
    sparse_indices,
    sparse_key,
)

if TYPE_CHECKING:
    from peft import PeftModel


def adapted_lora_layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    """The LoRA-wrapped layers, by the module name used in adapter keys."""
    return {name: module for name, module in model.named_modules()
            if getattr(module, "base_layer", None) is not None
            and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)}


def adapted_base_layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    """The base layers under LoRA, by the module name used in adapter keys."""
    return {name: module.base_layer for name, module in adapted_lora_layers(model).items()}


def transposed(model: PeftModel, module: str) -> bool:
    """Whether a module stores its weight as ``in x out`` (GPT-2's ``Conv1D``)."""
    return bool(getattr(adapted_lora_layers(model).get(module), "fan_in_fan_out", False))


def base_weights(model: PeftModel,
                 originals: Mapping[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """The base weight of every LoRA-adapted module as ``out x in`` float32, by module name.

    ``originals``: weights to report instead of the current ones (the pretrained weights
    of modules that carry a delta, :meth:`BaseDeltas.pretrained`).
    """
    out = {}
    for name, layer in adapted_base_layers(model).items():
        weight = (originals or {}).get(name, layer.weight).detach().float().cpu()
        out[name] = (weight.T if transposed(model, name) else weight).numpy().copy()
    return out


@dataclass
class BaseDeltas:
    """Deltas on the base weights of one model; ``seed`` fixes the sparse masks."""

    model: PeftModel
    seed: int
    _originals: dict[str, torch.Tensor] = field(default_factory=dict)
    _dense: set[str] = field(default_factory=set)
    _indices: dict[str, torch.Tensor] = field(default_factory=dict)
    _hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    def _layer(self, module: str) -> torch.nn.Module:
        layers = adapted_base_layers(self.model)
        if module not in layers:
            raise ValueError(f"base delta for '{module}', which has no LoRA-adapted layer")
        return layers[module]

    def _index(self, module: str, k: int) -> torch.Tensor:
        weight = self._layer(module).weight
        if module not in self._indices or len(self._indices[module]) != k:
            idx = sparse_indices(module, weight.numel(), k, self.seed)
            self._indices[module] = torch.from_numpy(idx).to(weight.device)
        return self._indices[module]

    def pretrained(self) -> dict[str, np.ndarray]:
        """Every adapted module's base weight without its delta (``out x in``, float32)."""
        return base_weights(self.model, self._originals)

    @property
    def modified(self) -> bool:
        """Whether any base weight currently differs from its original."""
        return bool(self._originals)

    def apply(self, deltas: Mapping[str, np.ndarray]) -> None:
        """Set each base weight to ``W0 + delta``; ``deltas`` are state entries (both kinds).

        A sparse delta adds on its module's mask; a dense one is the whole ``out x in``
        change (its shape must be the weight's, as PEFT stores it).
        """
        self.reset()
        for key, delta in deltas.items():
            module = module_of(key)
            weight = self._layer(module).weight
            if module in self._originals:
                raise ValueError(f"'{module}' has both a sparse and a dense base delta")
            self._originals[module] = weight.detach().clone()
            value = torch.as_tensor(delta, dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                if is_dense_key(key):
                    if transposed(self.model, module):  # deltas travel as out x in
                        value = value.T
                    if tuple(value.shape) != tuple(weight.shape):
                        raise ValueError(f"{key}: shape {tuple(value.shape)} does not match "
                                         f"the base weight's {tuple(weight.shape)}")
                    weight += value
                    self._dense.add(module)
                else:
                    flat = weight.view(-1)
                    flat[self._index(module, len(delta))] += value

    def extract(self) -> dict[str, np.ndarray]:
        """The current ``W - W0`` of every modified weight, as state entries.

        Sparse deltas on their masks (``<module>.sparse_delta``), dense ones whole
        (``<module>.base_delta``).
        """
        out = {}
        for module, original in self._originals.items():
            weight = self._layer(module).weight.detach()
            if module in self._dense:
                delta = (weight - original).float().cpu()
                out[dense_key(module)] = (delta.T if transposed(self.model, module)
                                          else delta).numpy().copy()
                continue
            idx = self._indices[module]
            delta = (weight.view(-1)[idx] - original.view(-1)[idx])
            out[sparse_key(module)] = delta.float().cpu().numpy().copy()
        return out

    def reset(self) -> None:
        """Restore every modified base weight to its original, stop training them."""
        self.stop_training()
        for module, original in self._originals.items():
            with torch.no_grad():
                self._layer(module).weight.copy_(original)
        self._originals.clear()
        self._dense.clear()

    def start_training(self) -> None:
        """Train the masked entries of the sparse-modified base weights (gradients masked)."""
        for module in self._originals.keys() - self._dense:
            weight = self._layer(module).weight
            mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
            mask[self._indices[module]] = 1.0
            mask = mask.view_as(weight)
            weight.requires_grad_(True)
            self._hooks.append(weight.register_hook(_masked(mask)))

    def stop_training(self) -> None:
        """Freeze the base weights again and remove the gradient masks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module in self._originals:
            self._layer(module).weight.requires_grad_(False)


def _masked(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda grad: grad * mask


def split_base(state: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """``(adapter state, base-weight deltas)`` from a flat state (deltas keep their keys)."""
    adapter = {k: v for k, v in state.items() if not is_base_key(k)}
    deltas = {k: v for k, v in state.items() if is_base_key(k)}
    return adapter, deltas
