"""Adapter parts that stay on the client across rounds, kept in Flower's ``context.state``.

Flower keeps a node's ``Context`` between rounds (in simulation and in deployment), so
private parts survive there; they never enter an outgoing message.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context

PRIVATE_KEY = "fedlora.private-adapter"


def load_private(context: Context, rank: int) -> dict[str, np.ndarray]:
    """The private parts stored by an earlier round, if they fit the current rank."""
    record = context.state.array_records.get(f"{PRIVATE_KEY}.r{rank}")
    if record is None:
        return {}
    return {key: array.numpy() for key, array in record.items()}


def store_private(context: Context, rank: int, state: dict[str, np.ndarray]) -> None:
    """Keep ``state`` (the private parts after training) for the next round."""
    if not state:
        return
    context.state[f"{PRIVATE_KEY}.r{rank}"] = ArrayRecord(
        {key: Array(np.ascontiguousarray(value)) for key, value in state.items()}
    )
