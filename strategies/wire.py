"""The adapter on the wire: Flower ``ArrayRecord`` with PEFT key names.

Arrays travel as numpy ``.npy`` bytes inside Flower's ``Array`` (which never enables
pickle). Encoding always produces C-contiguous float32 arrays.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.adapter import LoraAdapter

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
WIRE_DTYPE = np.float32


def adapter_to_record(adapter: LoraAdapter) -> ArrayRecord:
    """Encode an adapter as an ``ArrayRecord`` keyed by PEFT parameter names."""
    record = ArrayRecord()
    for key, value in adapter.items():
        record[key] = Array(np.ascontiguousarray(value, dtype=WIRE_DTYPE))
    return record


def state_to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """Encode a flat state dict (PEFT names) as an ``ArrayRecord``."""
    record = ArrayRecord()
    for key, value in state.items():
        record[key] = Array(np.ascontiguousarray(value, dtype=WIRE_DTYPE))
    return record


def record_to_adapter(record: ArrayRecord, alpha: float) -> LoraAdapter:
    """Decode a trusted ``ArrayRecord`` (one the server itself built) into an adapter.

    Updates received from clients go through :func:`strategies.validation.validate_update`
    instead, which checks sizes before decoding anything.
    """
    return LoraAdapter.from_state_dict({k: v.numpy() for k, v in record.items()}, alpha)


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of array payload in a record (the serialized ``.npy`` data of each array)."""
    return int(sum(len(array.data) for array in record.values()))
