"""Named parts of an adapter, for saying what is trained, sent and kept private.

``lora_A`` and ``lora_B`` are the two LoRA factors of every module; ``base`` are deltas
on the frozen base weights under them (:mod:`strategies.sparse`: SLoRA's sparse deltas,
a dense change a strategy folds into the frozen weights); ``extras`` are the other trainable
weights (a classification head). A strategy says, per round and per
client, which parts the client trains, which it sends back and which stay on the client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from strategies.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX
from strategies.sparse import is_base_key

LORA_A, LORA_B, EXTRAS, BASE = "lora_A", "lora_B", "extras", "base"
PARTS = (LORA_A, LORA_B, EXTRAS, BASE)
ALL_PARTS = frozenset(PARTS)
#: the adapter's own weights: what clients train and send unless a strategy says otherwise
ADAPTER_PARTS = frozenset({LORA_A, LORA_B, EXTRAS})


def part_of(key: str) -> str:
    """The part a PEFT state-dict key belongs to."""
    if key.endswith(LORA_A_SUFFIX):
        return LORA_A
    if key.endswith(LORA_B_SUFFIX):
        return LORA_B
    if is_base_key(key):
        return BASE
    return EXTRAS


def parse_parts(text: str) -> frozenset[str]:
    """Parse a comma-separated list of parts (``""`` is the empty set).

    Raises:
        ValueError: an unknown part name, listing the known ones.

    """
    parts = frozenset(p.strip() for p in text.split(",") if p.strip())
    unknown = sorted(parts - ALL_PARTS)
    if unknown:
        raise ValueError(f"unknown adapter part(s) {unknown}; known parts: {', '.join(PARTS)}")
    return parts


def format_parts(parts: Iterable[str]) -> str:
    """The comma-separated form of a set of parts, in canonical order."""
    chosen = set(parts)
    return ",".join(p for p in PARTS if p in chosen)


def select_parts(state: Mapping[str, np.ndarray], parts: Iterable[str]) -> dict[str, np.ndarray]:
    """The entries of a flat state dict that belong to ``parts``."""
    wanted = set(parts)
    return {k: v for k, v in state.items() if part_of(k) in wanted}
