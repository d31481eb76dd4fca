import numpy as np
import pytest

from strategies.adapter import LoraAdapter, LoraFactors
from strategies.fedit import fedit_aggregate
from strategies.registry import available_strategies, get_strategy_class


def _adapter(a, b, head):
    return LoraAdapter(
        modules={"m": LoraFactors(A=np.array(a, dtype=np.float32),
                                  B=np.array(b, dtype=np.float32))},
        alpha=4.0,
        extras={"head": np.array(head, dtype=np.float32)},
    )


def test_fedit_equals_hand_computed_weighted_average():
    # client 1: 10 examples, client 2: 30 examples -> weights 0.25 and 0.75
    c1 = _adapter(a=[[1, 2, 3]], b=[[4], [8]], head=[1, 1])
    c2 = _adapter(a=[[5, 6, 7]], b=[[0], [4]], head=[3, -1])
    out = fedit_aggregate([c1, c2], [10, 30])
    # A: 0.25*[1,2,3] + 0.75*[5,6,7] = [4, 5, 6]
    np.testing.assert_allclose(out.modules["m"].A, [[4.0, 5.0, 6.0]])
    # B: 0.25*[4,8] + 0.75*[0,4] = [1, 5]
    np.testing.assert_allclose(out.modules["m"].B, [[1.0], [5.0]])
    # head: 0.25*[1,1] + 0.75*[3,-1] = [2.5, -0.5]
    np.testing.assert_allclose(out.extras["head"], [2.5, -0.5])
    assert out.alpha == 4.0
    assert out.modules["m"].A.dtype == np.float32


def test_fedit_is_inexact_for_products():
    # avg(B) avg(A) = [1,5]^T [4,5,6] differs from avg(B A): the known FedIT error.
    c1 = _adapter(a=[[1, 2, 3]], b=[[4], [8]], head=[0, 0])
    c2 = _adapter(a=[[5, 6, 7]], b=[[0], [4]], head=[0, 0])
    out = fedit_aggregate([c1, c2], [10, 30])
    product_of_means = out.modules["m"].B @ out.modules["m"].A
    mean_of_products = 0.25 * (c1.modules["m"].B @ c1.modules["m"].A) + 0.75 * (
        c2.modules["m"].B @ c2.modules["m"].A)
    np.testing.assert_allclose(product_of_means, [[4, 5, 6], [20, 25, 30]])
    np.testing.assert_allclose(mean_of_products, [[1, 2, 3], [17, 22, 27]])


def test_single_client_is_identity():
    c = _adapter(a=[[1, 2]], b=[[3]], head=[7])
    out = fedit_aggregate([c], [5])
    np.testing.assert_array_equal(out.modules["m"].A, c.modules["m"].A)
    np.testing.assert_array_equal(out.extras["head"], c.extras["head"])


def test_bad_weights_raise():
    c = _adapter(a=[[1]], b=[[1]], head=[1])
    with pytest.raises(ValueError, match="positive"):
        fedit_aggregate([c, c], [1, 0])
    with pytest.raises(ValueError, match="at least one"):
        fedit_aggregate([], [])


def test_registry_knows_fedit_and_lists_known_names_for_unknown():
    assert "fedit" in available_strategies()
    assert get_strategy_class("fedit").name == "fedit"
    with pytest.raises(ValueError, match="unknown strategy 'fedavgg'; known strategies: .*fedit"):
        get_strategy_class("fedavgg")


def test_ffa_cannot_train_a_and_private_parts_cannot_be_aggregated():
    from strategies.fedsa import FedSALoRA
    from strategies.ffa import FFALoRA
    from strategies.parts import LORA_A, LORA_B

    class FFATrainingA(FFALoRA):
        train_parts = frozenset({LORA_A, LORA_B})

    with pytest.raises(ValueError, match="cannot train, send or receive A"):
        FFATrainingA(lora_alpha=8.0)

    class LeakyFedSA(FedSALoRA):
        send_parts = frozenset({LORA_A, LORA_B})

    with pytest.raises(ValueError, match=r"\['lora_B'\] are private but the strategy also"):
        LeakyFedSA(lora_alpha=8.0)
