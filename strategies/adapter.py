"""The LoRA adapter state: one small typed structure used everywhere.

A LoRA adapter maps a module name to its factors ``A`` (r x in) and ``B`` (out x r).
The update of a module is ``dW = (alpha / r) * B @ A``. Besides the factors, an
adapter may carry other trainable weights (a classification head, PEFT's
``modules_to_save``); those are averaged like ordinary weights.

Keys follow PEFT's own naming (``<module>.lora_A.weight``), so the flat state dict
round-trips with ``peft.get_peft_model_state_dict`` / ``set_peft_model_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraFactors:
    """The two LoRA factors of one module: ``A`` (r x in) and ``B`` (out x r)."""

    A: np.ndarray
    B: np.ndarray

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ValueError(
                f"LoRA factors must be matrices, got A{self.A.shape} and B{self.B.shape}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"LoRA rank mismatch: A has {self.A.shape[0]} rows but B has "
                f"{self.B.shape[1]} columns"
            )

    @property
    def rank(self) -> int:
        """The LoRA rank r."""
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        """Input width of the adapted layer."""
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        """Output width of the adapted layer."""
        return int(self.B.shape[0])

    def delta(self, alpha: float) -> np.ndarray:
        """The dense update ``(alpha / r) * B @ A`` (out x in); for tests and small layers."""
        return (alpha / self.rank) * (self.B @ self.A)


@dataclass
class LoraAdapter:
    """A LoRA adapter: per-module factors, the scaling ``alpha``, and extra trainable weights.

    ``rank`` may differ between modules (and between clients); the scale of a module
    is ``alpha / rank``.
    """

    modules: dict[str, LoraFactors]
    alpha: float
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be positive, got {self.alpha}")

    def scale(self, module: str) -> float:
        """The LoRA scale ``alpha / r`` of one module."""
        return self.alpha / self.modules[module].rank

    @property
    def ranks(self) -> dict[str, int]:
        """Rank of each module."""
        return {name: f.rank for name, f in self.modules.items()}

    @property
    def max_rank(self) -> int:
        """The largest rank over all modules (0 for an adapter without modules)."""
        return max((f.rank for f in self.modules.values()), default=0)

    def to_state_dict(self) -> dict[str, np.ndarray]:
        """Flat mapping with PEFT key names, factors first, then extras."""
        state: dict[str, np.ndarray] = {}
        for name, factors in self.modules.items():
            state[name + LORA_A_SUFFIX] = factors.A
            state[name + LORA_B_SUFFIX] = factors.B
        state.update(self.extras)
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray], alpha: float) -> LoraAdapter:
        """Build an adapter from a flat mapping with PEFT key names.

        Raises:
            ValueError: a module has only one of its two factors, or the state holds a
                LoRA parameter this structure does not model (DoRA magnitudes, LoRA bias).

        """
        a_parts: dict[str, np.ndarray] = {}
        b_parts: dict[str, np.ndarray] = {}
        extras: dict[str, np.ndarray] = {}
        for key, value in state.items():
            if key.endswith(LORA_A_SUFFIX):
                a_parts[key[: -len(LORA_A_SUFFIX)]] = value
            elif key.endswith(LORA_B_SUFFIX):
                b_parts[key[: -len(LORA_B_SUFFIX)]] = value
            elif ".lora_" in key:
                raise ValueError(
                    f"unsupported LoRA parameter '{key}': fedlora models plain LoRA "
                    "(lora_A/lora_B); disable DoRA and lora_bias"
                )
            else:
                extras[key] = value
        if a_parts.keys() != b_parts.keys():
            missing = sorted(a_parts.keys() ^ b_parts.keys())
            raise ValueError(f"modules with only one LoRA factor: {missing}")
        modules = {name: LoraFactors(A=a_parts[name], B=b_parts[name]) for name in a_parts}
        return cls(modules=modules, alpha=alpha, extras=extras)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Iterate over ``(key, array)`` in state-dict order."""
        yield from self.to_state_dict().items()

    def num_parameters(self) -> int:
        """Total number of scalars in the adapter."""
        return int(sum(v.size for v in self.to_state_dict().values()))

    def nbytes(self) -> int:
        """Raw size of all arrays in bytes."""
        return int(sum(v.nbytes for v in self.to_state_dict().values()))

    def astype(self, dtype: np.dtype | type) -> LoraAdapter:
        """A copy with every array cast to ``dtype``."""
        return LoraAdapter(
            modules={
                n: LoraFactors(A=f.A.astype(dtype), B=f.B.astype(dtype))
                for n, f in self.modules.items()
            },
            alpha=self.alpha,
            extras={k: v.astype(dtype) for k, v in self.extras.items()},
        )
