"""The one codec of fedlora's messages: record keys, array encoding, and its checks on receipt.

A message's content holds the adapter as an ``ArrayRecord`` under :data:`ARRAYS_KEY`
(PEFT key names), the round's settings under :data:`CONFIG_KEY` and the reply's figures
under :data:`METRICS_KEY`. Arrays travel as numpy ``.npy`` bytes inside Flower's ``Array``
(which never enables pickle); encoding always produces C-contiguous :data:`WIRE_DTYPE`
arrays. The update validation (:mod:`strategies.validation`) and the payload transport
(:mod:`privacy.flower`) use these keys and :func:`check_array_header` /
:func:`decode_array`, so what is accepted is decided here once.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.adapter import LoraAdapter
from strategies.errors import UpdateRejected

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
WIRE_DTYPE = np.float32
#: dtypes an update may carry (what the codec encodes)
WIRE_DTYPES = frozenset({np.dtype(WIRE_DTYPE).name})
# An .npy header is 128 bytes for any array a client can legitimately send here;
# allow a little more, never more than that.
NPY_HEADER_SLACK = 256


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


def check_array_header(key: str, array: Array, max_shape: tuple[int, ...],
                       dtypes: frozenset[str] = WIRE_DTYPES) -> None:
    """Cheap checks on a received array's metadata and size, before any decoding.

    Raises:
        UpdateRejected: another serialization or dtype, a shape that does not fit
            ``max_shape``, or more bytes than that shape needs.

    """
    if array.stype != "numpy.ndarray":
        raise UpdateRejected(f"{key}: unsupported serialization '{array.stype}'")
    if array.dtype not in dtypes:
        raise UpdateRejected(f"{key}: dtype {array.dtype} not accepted ({sorted(dtypes)})")
    shape = tuple(int(s) for s in array.shape)
    if len(shape) != len(max_shape) or any(s > m for s, m in zip(shape, max_shape, strict=True)):
        raise UpdateRejected(f"{key}: shape {shape} does not fit the expected {max_shape}")
    limit = int(np.prod(max_shape)) * np.dtype(array.dtype).itemsize + NPY_HEADER_SLACK
    if len(array.data) > limit:
        raise UpdateRejected(f"{key}: payload of {len(array.data)} bytes exceeds {limit}")


def decode_array(key: str, array: Array) -> np.ndarray:
    """Decode one received array (pickle disabled); it must match its metadata and be finite.

    Raises:
        UpdateRejected: undecodable, not what its metadata says, or holding NaN or Inf.

    """
    try:
        value = array.numpy()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a rejection
        raise UpdateRejected(f"{key}: undecodable array ({exc})") from exc
    if value.dtype.name != array.dtype or tuple(value.shape) != tuple(array.shape):
        raise UpdateRejected(f"{key}: decoded array does not match its declared dtype/shape")
    if not np.isfinite(value).all():
        raise UpdateRejected(f"{key}: contains NaN or Inf")
    return value
