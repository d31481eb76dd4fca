import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies.codec import adapter_to_record
from strategies.validation import UpdateRejected, UpdateSpec, validate_update
from tests.conftest import random_adapter

RNG = np.random.default_rng(0)
GLOBAL = random_adapter(RNG, {"m.q": 4, "m.v": 4})
SPEC = UpdateSpec.matching(GLOBAL, max_num_examples=10_000)
A_KEY, B_KEY, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "base_model.model.classifier.weight"


def reply(record: ArrayRecord | None = None, num_examples: object = 100, **extra) -> RecordDict:
    record = adapter_to_record(GLOBAL) if record is None else record
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": 0.5})
    return RecordDict({"arrays": record, "metrics": metrics, **extra})


def with_array(key: str, array: Array) -> ArrayRecord:
    record = adapter_to_record(GLOBAL)
    record[key] = array
    return record


def rejected(content: RecordDict, spec: UpdateSpec = SPEC) -> str:
    with pytest.raises(UpdateRejected) as info:
        validate_update(content, spec, node_id=1)
    return info.value.reason


def test_valid_update_is_decoded():
    update = validate_update(reply(), SPEC, node_id=7)
    assert update.node_id == 7 and update.num_examples == 100
    assert update.metrics["train-loss"] == 0.5
    assert set(update.state) == set(GLOBAL.to_state_dict())
    np.testing.assert_array_equal(update.state[A_KEY], GLOBAL.modules["m.q"].A)


def test_missing_key():
    record = adapter_to_record(GLOBAL)
    del record[B_KEY]
    assert "missing ['m.q.lora_B.weight']" in rejected(reply(record))


def test_extra_key():
    record = adapter_to_record(GLOBAL)
    record["evil.weight"] = Array(np.zeros(3, dtype=np.float32))
    assert "extra ['evil.weight']" in rejected(reply(record))


def test_wrong_shape():
    reason = rejected(reply(with_array(HEAD, Array(np.zeros((3, 7), dtype=np.float32)))))
    assert "shape (3, 7) does not fit" in reason


def test_rank_above_maximum():
    reason = rejected(reply(with_array(A_KEY, Array(np.zeros((5, 6), dtype=np.float32)))))
    assert "shape (5, 6) does not fit the expected (4, 6)" in reason


def test_rank_below_required_when_exact():
    record = with_array(A_KEY, Array(np.zeros((2, 6), dtype=np.float32)))
    record[B_KEY] = Array(np.zeros((5, 2), dtype=np.float32))
    assert "rank 2 not allowed (exactly 4)" in rejected(reply(record))


def test_lower_rank_allowed_when_not_exact():
    spec = UpdateSpec.matching(GLOBAL, max_num_examples=10_000, exact_rank=False)
    record = with_array(A_KEY, Array(np.ones((2, 6), dtype=np.float32)))
    record[B_KEY] = Array(np.ones((5, 2), dtype=np.float32))
    update = validate_update(reply(record), spec, node_id=1)
    assert update.state[A_KEY].shape == (2, 6)


def test_inconsistent_factor_ranks():
    record = with_array(A_KEY, Array(np.zeros((3, 6), dtype=np.float32)))
    assert "inconsistent" in rejected(reply(record))


def test_wrong_dtype():
    reason = rejected(reply(with_array(HEAD, Array(np.zeros((3, 6), dtype=np.float64)))))
    assert "dtype float64 not accepted" in reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad):
    values = np.zeros((3, 6), dtype=np.float32)
    values[1, 2] = bad
    assert "NaN or Inf" in rejected(reply(with_array(HEAD, Array(values))))


@pytest.mark.parametrize(
    ("count", "message"),
    [(0, "must be positive"), (-5, "must be positive"), (float("nan"), "whole number"),
     (1e12, "exceeds the cap"), (10**20, "exceeds the cap"), (2.5, "whole number"),
     ([1, 2], "must be a number")],
)
def test_bad_example_counts(count, message):
    assert message in rejected(reply(num_examples=count))


def test_missing_metrics_and_count():
    content = RecordDict({"arrays": adapter_to_record(GLOBAL)})
    assert "missing MetricRecord" in rejected(content)
    content = RecordDict({"arrays": adapter_to_record(GLOBAL), "metrics": MetricRecord({"x": 1})})
    assert "missing 'num-examples'" in rejected(content)


def test_two_array_records():
    assert "expected one ArrayRecord" in rejected(reply(extra=adapter_to_record(GLOBAL)))


def test_oversized_payload_rejected_before_decoding():
    # metadata claims the right shape, the bytes are 1000x larger
    big = Array(dtype="float32", shape=(3, 6), stype="numpy.ndarray", data=b"\0" * 72_000)
    assert "payload of 72000 bytes exceeds" in rejected(reply(with_array(HEAD, big)))


def test_metadata_that_lies_about_the_shape():
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 2), dtype=np.float32), allow_pickle=False)
    liar = Array(dtype="float32", shape=(3, 6), stype="numpy.ndarray", data=buffer.getvalue())
    assert "does not match its declared" in rejected(reply(with_array(HEAD, liar)))


def test_unknown_serialization():
    odd = Array(dtype="float32", shape=(3, 6), stype="torch.save", data=b"x")
    assert "unsupported serialization" in rejected(reply(with_array(HEAD, odd)))


class _Exploit:
    marker: str = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_rejected_and_never_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    payload = pickle.dumps(_Exploit())
    evil = Array(dtype="float32", shape=(3, 6), stype="numpy.ndarray", data=payload)
    reason = rejected(reply(with_array(HEAD, evil)))
    assert "undecodable" in reason
    assert not marker.exists()
    # also as an .npy with an object dtype header
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Exploit()], dtype=object), allow_pickle=True)
    evil = Array(dtype="float32", shape=(3, 6), stype="numpy.ndarray", data=buffer.getvalue())
    rejected(reply(with_array(HEAD, evil)))
    assert not marker.exists()


def test_configrecord_in_reply_is_ignored_but_arrays_still_checked():
    content = reply(extra_config=ConfigRecord({"a": 1}))
    update = validate_update(content, SPEC, node_id=1)
    assert len(update.state) == len(GLOBAL.to_state_dict())
