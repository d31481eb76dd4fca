"""HetLoRA and FlexLoRA glue, driven with mock messages (no Flower running)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from strategies.codec import adapter_to_record, record_to_adapter
from strategies.flexlora import FlexLoRA, FlexLoRAConfig, flexlora_aggregate
from strategies.flexlora_math import dense_svd
from strategies.hetlora import HetLoRA, HetLoRAConfig
from strategies.hetlora_math import hetlora_aggregate, pad_adapter, sparsity_weights, with_alpha
from tests.conftest import random_adapter

pytestmark = pytest.mark.usefixtures("task_identity")


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3]


def _configure(strategy, global_adapter):
    messages = strategy.configure_train(1, adapter_to_record(global_adapter), ConfigRecord(),
                                        FakeGrid())
    return {m.metadata.dst_node_id: m for m in messages}


def _reply(message, adapter, n):
    return Message(RecordDict({"arrays": adapter_to_record(adapter),
                               "metrics": MetricRecord({"num-examples": n})}), reply_to=message)


def _plan(**extra):
    return HetLoRAConfig(client_ranks="1,2,4", **extra)


def _flex_plan(**extra):
    return FlexLoRAConfig(client_ranks="1,2,4", **extra)


def test_hetlora_sends_truncated_factors_with_a_constant_scale():
    strategy = HetLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                       config=_plan())
    g = random_adapter(np.random.default_rng(0), {"m": 4})
    messages = _configure(strategy, g)
    config = messages[1].content["config"]
    assert config["adapter-rank"] == 1 and config["adapter-alpha"] == 2.0  # 8 * 1/4: scale 2 kept
    assert config["opt.hetlora-gamma"] == 0.99
    sent = record_to_adapter(messages[2].content["arrays"], 4.0)
    np.testing.assert_array_equal(sent.modules["m"].A, g.modules["m"].A[:2])
    np.testing.assert_array_equal(sent.modules["m"].B, g.modules["m"].B[:, :2])


def test_hetlora_aggregates_padded_updates_with_sparsity_weights_and_keeps_pruned_ranks():
    strategy = HetLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                       config=_plan())
    g = random_adapter(np.random.default_rng(0), {"m": 4})
    messages = _configure(strategy, g)
    rng = np.random.default_rng(1)
    updates = {1: random_adapter(rng, {"m": 1}, alpha=2.0),
               2: random_adapter(rng, {"m": 1}, alpha=2.0),  # pruned from 2 to 1
               4: None}
    updates[4] = random_adapter(rng, {"m": 4}, alpha=8.0)
    replies = [_reply(messages[1], updates[1], 10), _reply(messages[2], updates[2], 10),
               _reply(messages[3], updates[4], 10)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-accepted"] == 3
    padded = [with_alpha(pad_adapter(a, 4), 8.0) for a in (updates[1], updates[2], updates[4])]
    expected = hetlora_aggregate(padded, sparsity_weights(padded), 4)
    got = record_to_adapter(arrays, 8.0)
    np.testing.assert_allclose(got.modules["m"].A, expected.modules["m"].A, rtol=1e-6)
    np.testing.assert_allclose(got.modules["m"].B, expected.modules["m"].B, rtol=1e-6)
    assert strategy.ranks == {1: 1, 2: 1, 3: 4}
    assert strategy.history[1].client_ranks == {1: 1, 2: 1, 3: 4}


def test_hetlora_rejects_a_rank_above_what_was_sent():
    strategy = HetLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                       config=_plan())
    messages = _configure(strategy, random_adapter(np.random.default_rng(0), {"m": 4}))
    too_big = random_adapter(np.random.default_rng(1), {"m": 2}, alpha=4.0)
    strategy.aggregate_train(1, [_reply(messages[1], too_big, 10)])
    assert "does not fit the expected" in strategy.history[1].rejections[0][1]


def test_flexlora_global_is_the_truncated_svd_of_the_weighted_updates():
    rng = np.random.default_rng(3)
    clients = [random_adapter(rng, {"m": r}, alpha=8.0 * r / 4) for r in (1, 2, 4)]
    counts = [10, 30, 60]
    for split in ("B", "sqrt"):
        out = flexlora_aggregate(clients, counts, rank=4, alpha=8.0, split=split)
        coeffs = [n / 100 * 2.0 for n in counts]  # every client has scale 2
        U, S, Vt = dense_svd([c.modules["m"].B for c in clients],
                             [c.modules["m"].A for c in clients], coeffs, 4)
        expected = (U * S) @ Vt
        np.testing.assert_allclose(out.modules["m"].delta(8.0), expected, rtol=1e-4, atol=1e-5)
        # the top-2 truncation a rank-2 client receives is the best rank-2 approximation
        f2 = out.modules["m"]
        top2 = 2.0 * f2.B[:, :2] @ f2.A[:2]
        np.testing.assert_allclose(top2, (U[:, :2] * S[:2]) @ Vt[:2], rtol=1e-4, atol=1e-5)


def test_flexlora_strategy_records_ranks_and_uses_the_split():
    strategy = FlexLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                        config=_flex_plan(flexlora_split="sqrt"))
    messages = _configure(strategy, random_adapter(np.random.default_rng(0), {"m": 4}))
    rng = np.random.default_rng(5)
    replies = [_reply(messages[n], random_adapter(rng, {"m": r}, alpha=2.0 * r), 10)
               for n, r in ((1, 1), (2, 2), (3, 4))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-accepted"] == 3 and metrics["rank-sum"] == 7.0
    got = record_to_adapter(arrays, 8.0)
    norms_a = np.linalg.norm(got.modules["m"].A, axis=1)
    norms_b = np.linalg.norm(got.modules["m"].B, axis=0)
    np.testing.assert_allclose(norms_a, norms_b, rtol=1e-4)  # sqrt split balances them


def test_bad_strategy_settings_raise_in_the_constructor():
    with pytest.raises(ValueError, match="hetlora-gamma must be in"):
        HetLoRAConfig(hetlora_gamma=1.5)
    with pytest.raises(ValueError, match="hetlora-weighting must be one of"):
        HetLoRAConfig(hetlora_weighting="equal")
    with pytest.raises(ValueError, match="flexlora-split must be one of"):
        FlexLoRAConfig(flexlora_split="A")


class RegisteringGrid:
    """Nodes that register while the first round starts: none, then one, then all."""

    def __init__(self, final):
        self.views = [[], [1], list(final)]

    def get_node_ids(self):
        return self.views.pop(0) if len(self.views) > 1 else self.views[0]


@pytest.mark.parametrize("cls", [HetLoRA, FlexLoRA])
def test_explicit_ranks_wait_for_the_nodes_still_registering(cls, monkeypatch):
    import strategies.messaging

    monkeypatch.setattr(strategies.messaging, "NODE_POLL_INTERVAL", 0.0)
    config = cls.config_class(client_ranks="1,2,4")
    strategy = cls(lora_alpha=8.0, min_train_nodes=2, min_available_nodes=2, config=config)
    g = random_adapter(np.random.default_rng(0), {"m": 4})
    messages = strategy.configure_train(1, adapter_to_record(g), ConfigRecord(),
                                        RegisteringGrid([1, 2, 3]))
    assert strategy.ranks == {1: 1, 2: 2, 3: 4}
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    with pytest.raises(ValueError, match="client-ranks lists 3 ranks but there are 4 clients"):
        cls(lora_alpha=8.0, config=config).configure_train(
            1, adapter_to_record(g), ConfigRecord(), RegisteringGrid([1, 2, 3, 4]))
