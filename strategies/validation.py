"""Validation of client updates before aggregation.

Every reply is checked against what the server asked for: the record layout, the
keys, the shapes and ranks, the dtype, the payload sizes (before anything is
decoded), finiteness, and the reported example count. A bad update raises
:class:`UpdateRejected` with a reason; it is never aggregated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from strategies.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX, LoraAdapter
from strategies.codec import (
    ARRAYS_KEY,
    METRICS_KEY,
    WIRE_DTYPES,
    check_array_header,
    decode_array,
)
from strategies.errors import UpdateRejected

NUM_EXAMPLES_KEY = "num-examples"


@dataclass(frozen=True)
class ModuleSpec:
    """Expected geometry of one LoRA module in an update."""

    in_features: int
    out_features: int
    max_rank: int
    exact_rank: bool = True


@dataclass(frozen=True)
class UpdateSpec:
    """What a valid update from one client looks like.

    Attributes:
        modules: expected LoRA modules and their geometry.
        extras: expected extra trainable weights and their shapes.
        max_num_examples: reported example counts above this are rejected.
        dtypes: accepted array dtypes (names as numpy spells them).
        required_keys: keys that must be present; by default every module's A and B
            and every extra. Strategies that upload only part of the adapter (B only,
            say) narrow it.

    """

    modules: dict[str, ModuleSpec]
    extras: dict[str, tuple[int, ...]] = field(default_factory=dict)
    max_num_examples: int = 1_000_000
    dtypes: frozenset[str] = WIRE_DTYPES
    required_keys: frozenset[str] | None = None

    @classmethod
    def matching(
        cls, adapter: LoraAdapter, *, max_num_examples: int, exact_rank: bool = True
    ) -> UpdateSpec:
        """The spec of an update with exactly the keys and shapes of ``adapter``."""
        return cls(
            modules={
                name: ModuleSpec(f.in_features, f.out_features, f.rank, exact_rank)
                for name, f in adapter.modules.items()
            },
            extras={k: tuple(v.shape) for k, v in adapter.extras.items()},
            max_num_examples=max_num_examples,
        )

    def expected_keys(self) -> frozenset[str]:
        """Every key the update must carry."""
        if self.required_keys is not None:
            return self.required_keys
        keys = {m + LORA_A_SUFFIX for m in self.modules} | {m + LORA_B_SUFFIX for m in self.modules}
        return frozenset(keys | set(self.extras))

    def max_shape(self, key: str) -> tuple[int, ...]:
        """The largest shape ``key`` may have."""
        if key.endswith(LORA_A_SUFFIX):
            m = self.modules[key[: -len(LORA_A_SUFFIX)]]
            return (m.max_rank, m.in_features)
        if key.endswith(LORA_B_SUFFIX):
            m = self.modules[key[: -len(LORA_B_SUFFIX)]]
            return (m.out_features, m.max_rank)
        return self.extras[key]


@dataclass
class ClientUpdate:
    """A validated update from one client.

    ``state`` holds the decoded arrays by PEFT key: what the client sent, which may be a
    part of the adapter. ``adapter`` is the client's whole adapter: what it sent, and for
    the parts it did not send, what the server had sent it (set by the strategy).
    """

    node_id: int
    num_examples: int
    state: dict[str, np.ndarray]
    metrics: dict[str, float]
    adapter: LoraAdapter | None = None


def validate_num_examples(value: object, cap: int) -> int:
    """Check a reported example count: a finite integer in ``[1, cap]``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UpdateRejected(f"num-examples must be a number, got {type(value).__name__}")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise UpdateRejected(f"num-examples must be a whole number, got {value}")
    count = int(value)
    if count < 1:
        raise UpdateRejected(f"num-examples must be positive, got {count}")
    if count > cap:
        raise UpdateRejected(f"num-examples {count} exceeds the cap {cap} (max-num-examples)")
    return count


def _check_partial_factor(
    name: str, m: ModuleSpec, a: np.ndarray | None, b: np.ndarray | None
) -> None:
    """A partial upload (one factor, as ``required_keys`` allows) must fit the other one.

    The factor not sent is the one the server sent the node, at rank ``max_rank``, so
    the one sent must have exactly its full shape: a narrower ``B`` (or shorter ``A``)
    would pass the header check but could not be combined with the server's factor.
    """
    if a is not None:
        factor, shape, expected = "A", tuple(a.shape), (m.max_rank, m.in_features)
    elif b is not None:
        factor, shape, expected = "B", tuple(b.shape), (m.out_features, m.max_rank)
    else:
        return
    if shape != expected:
        raise UpdateRejected(
            f"{name}: {factor}{shape} does not match the expected {expected} "
            f"(the other factor is the server's, at rank {m.max_rank})"
        )


def _check_modules(state: dict[str, np.ndarray], spec: UpdateSpec) -> None:
    """Exact shapes per module: A and B share one rank within the allowed bounds."""
    for name, m in spec.modules.items():
        a, b = state.get(name + LORA_A_SUFFIX), state.get(name + LORA_B_SUFFIX)
        if a is None and b is None:
            continue
        if a is None or b is None:
            _check_partial_factor(name, m, a, b)
            continue
        rank = a.shape[0]
        if a.shape != (rank, m.in_features) or b.shape != (m.out_features, rank):
            raise UpdateRejected(
                f"{name}: factor shapes A{a.shape} B{b.shape} are inconsistent "
                f"(expected A(r, {m.in_features}) and B({m.out_features}, r))"
            )
        if not 1 <= rank <= m.max_rank or (m.exact_rank and rank != m.max_rank):
            allowed = f"exactly {m.max_rank}" if m.exact_rank else f"1..{m.max_rank}"
            raise UpdateRejected(f"{name}: rank {rank} not allowed ({allowed})")
    for key, shape in spec.extras.items():
        if key in state and state[key].shape != shape:
            raise UpdateRejected(f"{key}: shape {state[key].shape} != expected {shape}")


def validate_update(content: RecordDict, spec: UpdateSpec, *, node_id: int) -> ClientUpdate:
    """Validate one reply's content and decode it.

    Raises:
        UpdateRejected: with the reason, for any deviation from ``spec``.

    """
    if set(content.array_records) != {ARRAYS_KEY}:
        raise UpdateRejected(
            f"expected one ArrayRecord '{ARRAYS_KEY}', got {sorted(content.array_records)}"
        )
    if METRICS_KEY not in content.metric_records:
        raise UpdateRejected(f"missing MetricRecord '{METRICS_KEY}'")
    metrics: MetricRecord = content.metric_records[METRICS_KEY]
    if NUM_EXAMPLES_KEY not in metrics:
        raise UpdateRejected(f"missing '{NUM_EXAMPLES_KEY}' in metrics")
    num_examples = validate_num_examples(metrics[NUM_EXAMPLES_KEY], spec.max_num_examples)

    record: ArrayRecord = content.array_records[ARRAYS_KEY]
    keys, expected = set(record.keys()), spec.expected_keys()
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise UpdateRejected(f"unexpected keys: missing {missing[:5]}, extra {extra[:5]}")
    for key in expected:
        check_array_header(key, record[key], spec.max_shape(key), spec.dtypes)
    state = {key: decode_array(key, record[key]) for key in expected}
    _check_modules(state, spec)

    numeric = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    return ClientUpdate(node_id=node_id, num_examples=num_examples, state=state, metrics=numeric)
