import numpy as np
import pytest

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.codec import adapter_to_record, record_nbytes, record_to_adapter
from tests.conftest import random_adapter


def test_state_dict_round_trip_keeps_keys_values_and_ranks():
    rng = np.random.default_rng(0)
    adapter = random_adapter(rng, {"m.q": 2, "m.v": 3})
    state = adapter.to_state_dict()
    assert list(state) == ["m.q.lora_A.weight", "m.q.lora_B.weight", "m.v.lora_A.weight",
                           "m.v.lora_B.weight", "base_model.model.classifier.weight"]
    back = LoraAdapter.from_state_dict(state, alpha=8.0)
    assert back.ranks == {"m.q": 2, "m.v": 3}
    assert back.scale("m.v") == pytest.approx(8.0 / 3)
    for key, value in back.to_state_dict().items():
        np.testing.assert_array_equal(value, state[key])


def test_arrayrecord_round_trip_is_exact():
    adapter = random_adapter(np.random.default_rng(1), {"a": 4})
    record = adapter_to_record(adapter)
    back = record_to_adapter(record, alpha=adapter.alpha)
    for key, value in adapter.items():
        np.testing.assert_array_equal(back.to_state_dict()[key], value)
    # payload is the raw bytes plus one small .npy header per array
    assert adapter.nbytes() < record_nbytes(record) <= adapter.nbytes() + 128 * len(record)


def test_delta_is_scaled_product():
    f = LoraFactors(A=np.array([[1.0, 2.0]]), B=np.array([[3.0], [4.0]]))
    np.testing.assert_allclose(f.delta(alpha=2.0), 2.0 * np.array([[3.0, 6.0], [4.0, 8.0]]))


def test_rank_mismatch_between_factors_is_an_error():
    with pytest.raises(ValueError, match="rank mismatch"):
        LoraFactors(A=np.zeros((2, 4)), B=np.zeros((3, 3)))


def test_module_with_one_factor_is_an_error():
    with pytest.raises(ValueError, match="only one LoRA factor"):
        LoraAdapter.from_state_dict({"m.lora_A.weight": np.zeros((2, 3))}, alpha=1.0)


def test_unsupported_lora_parameter_is_named():
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        LoraAdapter.from_state_dict({"m.lora_magnitude_vector": np.zeros(3)}, alpha=1.0)


def test_alpha_must_be_positive():
    with pytest.raises(ValueError, match="alpha"):
        LoraAdapter(modules={}, alpha=0.0)
