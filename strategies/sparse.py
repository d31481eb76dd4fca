"""Deltas on the base weights under LoRA, as adapter state entries (the ``base`` part).

Two kinds travel, keyed by the adapted module's name:

- sparse (``<module>.sparse_delta``, SLoRA's first stage): ``k`` values on a fixed
  random mask of the ``out x in`` weight, drawn from the run seed and the module's name,
  so the server and every client derive the same mask and only the values travel;
- dense (``<module>.base_delta``): the whole ``out x in``
  change folded into the frozen base weight, from the start of the run.

A client's model applies them to its base weights (``task.base_deltas.BaseDeltas``).
"""

from __future__ import annotations

import zlib

import numpy as np

from strategies.config import ConfigError

SPARSE_SUFFIX = ".sparse_delta"
DENSE_SUFFIX = ".base_delta"


def sparse_key(module: str) -> str:
    """The state key of a module's sparse delta."""
    return module + SPARSE_SUFFIX


def is_sparse_key(key: str) -> bool:
    """Whether a state key holds a sparse delta."""
    return key.endswith(SPARSE_SUFFIX)


def dense_key(module: str) -> str:
    """The state key of a module's dense base-weight delta."""
    return module + DENSE_SUFFIX


def is_dense_key(key: str) -> bool:
    """Whether a state key holds a dense base-weight delta."""
    return key.endswith(DENSE_SUFFIX)


def is_base_key(key: str) -> bool:
    """Whether a state key holds a base-weight delta (sparse or dense)."""
    return is_sparse_key(key) or is_dense_key(key)


def module_of(key: str) -> str:
    """The module a base-delta key (sparse or dense) belongs to."""
    return key[: -len(SPARSE_SUFFIX if is_sparse_key(key) else DENSE_SUFFIX)]


def mask_size(shape: tuple[int, int], density: float) -> int:
    """Number of trained entries for a weight of ``shape`` at ``density`` (at least 1)."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"slora-density must be in (0, 1], got {density}")
    return max(1, round(density * shape[0] * shape[1]))


def sparse_indices(module: str, numel: int, k: int, seed: int) -> np.ndarray:
    """The sorted flat indices of a module's mask: ``k`` of ``numel``, from seed and name."""
    if not 1 <= k <= numel:
        raise ValueError(f"{module}: mask of {k} entries does not fit {numel}")
    rng = np.random.default_rng([seed, zlib.crc32(module.encode())])
    return np.sort(rng.choice(numel, size=k, replace=False))


def densify(delta: np.ndarray, module: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    """The dense ``out x in`` update that a sparse delta stands for."""
    numel = shape[0] * shape[1]
    dense = np.zeros(numel, dtype=np.float64)
    dense[sparse_indices(module, numel, len(delta), seed)] = delta
    return dense.reshape(shape)
