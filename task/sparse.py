"""Training and applying sparse updates of the base weights adapted by LoRA (SLoRA stage 1).

The base weight of every LoRA-adapted layer can carry a sparse delta on a fixed mask
(:mod:`strategies.sparse`). The original weights are kept so that a reused model is
reset exactly before each round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from strategies.sparse import module_of, sparse_indices, sparse_key

if TYPE_CHECKING:
    from peft import PeftModel


def adapted_base_layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    """The base layers under LoRA, by the module name used in adapter keys."""
    layers = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is not None and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
            layers[name] = base
    return layers


@dataclass
class SparseBase:
    """Sparse deltas on the base weights of one model; ``seed`` fixes the masks."""

    model: PeftModel
    seed: int
    _originals: dict[str, torch.Tensor] = field(default_factory=dict)
    _indices: dict[str, torch.Tensor] = field(default_factory=dict)
    _hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    def _layer(self, module: str) -> torch.nn.Module:
        layers = adapted_base_layers(self.model)
        if module not in layers:
            raise ValueError(f"sparse delta for '{module}', which has no LoRA-adapted layer")
        return layers[module]

    def _index(self, module: str, k: int) -> torch.Tensor:
        weight = self._layer(module).weight
        if module not in self._indices or len(self._indices[module]) != k:
            idx = sparse_indices(module, weight.numel(), k, self.seed)
            self._indices[module] = torch.from_numpy(idx).to(weight.device)
        return self._indices[module]

    @property
    def modified(self) -> bool:
        """Whether any base weight currently differs from its original."""
        return bool(self._originals)

    def apply(self, deltas: Mapping[str, np.ndarray]) -> None:
        """Set each module's base weight to ``W0 + delta`` on its mask (keys by module)."""
        self.reset()
        for module, delta in deltas.items():
            weight = self._layer(module).weight
            self._originals[module] = weight.detach().clone()
            idx = self._index(module, len(delta))
            with torch.no_grad():
                flat = weight.view(-1)
                flat[idx] += torch.as_tensor(delta, dtype=weight.dtype, device=weight.device)

    def extract(self) -> dict[str, np.ndarray]:
        """The current ``W - W0`` on each mask, as state keys (``<module>.sparse_delta``)."""
        out = {}
        for module, original in self._originals.items():
            weight = self._layer(module).weight
            idx = self._indices[module]
            delta = (weight.detach().view(-1)[idx] - original.view(-1)[idx])
            out[sparse_key(module)] = delta.float().cpu().numpy().copy()
        return out

    def reset(self) -> None:
        """Restore every modified base weight to its original, stop training them."""
        self.stop_training()
        for module, original in self._originals.items():
            with torch.no_grad():
                self._layer(module).weight.copy_(original)
        self._originals.clear()

    def start_training(self) -> None:
        """Train the masked entries of the modified base weights (gradients masked)."""
        for module in self._originals:
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


def split_sparse(state: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """``(adapter state, sparse deltas by module)`` from a flat state."""
    from strategies.sparse import is_sparse_key

    adapter = {k: v for k, v in state.items() if not is_sparse_key(k)}
    deltas = {module_of(k): v for k, v in state.items() if is_sparse_key(k)}
    return adapter, deltas
