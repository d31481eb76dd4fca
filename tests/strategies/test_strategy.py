"""The Flower glue, driven with mock messages: no server running."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from strategies.codec import adapter_to_record, record_to_adapter
from strategies.fedit import FedIT, fedit_aggregate
from tests.conftest import random_adapter

pytestmark = pytest.mark.usefixtures("task_identity")


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _reply_to(message: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=message)


def _update(adapter, n):
    return RecordDict({"arrays": adapter_to_record(adapter),
                       "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})})


def _configured(strategy, nodes=(11, 12, 13)):
    global_adapter = random_adapter(np.random.default_rng(0), {"m": 2})
    messages = list(strategy.configure_train(1, adapter_to_record(global_adapter),
                                             ConfigRecord(), FakeGrid(nodes)))
    return global_adapter, {m.metadata.dst_node_id: m for m in messages}


def _message_for(node_id: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord()})
    return Message(content=content, message_type="train", dst_node_id=node_id)


def test_configure_train_sends_global_adapter_and_instructions():
    strategy = FedIT(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3)
    global_adapter, messages = _configured(strategy)
    assert sorted(messages) == [11, 12, 13]
    content = messages[11].content
    assert content["config"]["strategy"] == "fedit"
    assert content["config"]["server-round"] == 1 and content["config"]["adapter-rank"] == 2
    sent = record_to_adapter(content["arrays"], 8.0)
    np.testing.assert_array_equal(sent.modules["m"].A, global_adapter.modules["m"].A)
    assert strategy.history[1].bytes_down == 3 * sum(
        len(a.data) for a in adapter_to_record(global_adapter).values())


def test_sampling_is_seeded_and_respects_fraction():
    picks = []
    for _ in range(2):
        strategy = FedIT(lora_alpha=8.0, fraction_train=0.5, min_train_nodes=1,
                         min_available_nodes=1, seed=3)
        _, messages = _configured(strategy, nodes=range(1, 11))
        picks.append(sorted(messages))
    assert len(picks[0]) == 5 and picks[0] == picks[1]


def test_bad_updates_are_left_out_and_the_aggregate_equals_the_honest_ones():
    strategy = FedIT(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3)
    global_adapter, messages = _configured(strategy)
    rng = np.random.default_rng(5)
    honest = [random_adapter(rng, {"m": 2}) for _ in range(2)]
    poisoned = random_adapter(rng, {"m": 2})
    poisoned.modules["m"].A[0, 0] = np.nan
    replies = [
        _reply_to(messages[11], _update(honest[0], 10)),
        _reply_to(messages[12], _update(honest[1], 30)),
        _reply_to(messages[13], _update(poisoned, 1000)),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = fedit_aggregate(honest, [10, 30])
    got = record_to_adapter(arrays, 8.0)
    np.testing.assert_allclose(got.modules["m"].A, expected.modules["m"].A, rtol=1e-6)
    np.testing.assert_allclose(got.modules["m"].B, expected.modules["m"].B, rtol=1e-6)
    assert metrics["num-accepted"] == 2 and metrics["num-rejected"] == 1
    assert strategy.history[1].rejections[0][0] == 13
    assert "NaN or Inf" in strategy.history[1].rejections[0][1]


def test_errors_duplicates_and_strangers_do_not_crash_the_round():
    strategy = FedIT(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3)
    _, messages = _configured(strategy)
    good = random_adapter(np.random.default_rng(2), {"m": 2})
    replies = [
        _reply_to(messages[11], _update(good, 10)),
        _reply_to(messages[11], _update(good, 10)),  # the same node again
        Message(Error(code=1, reason="client crashed"), reply_to=messages[12]),
        _reply_to(_message_for(99), _update(good, 10)),  # never sampled
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    stats = strategy.history[1]
    assert (stats.accepted, stats.rejected, stats.failed) == (1, 2, 1)
    reasons = " ".join(r for _, r in stats.rejections)
    assert "second reply" in reasons and "not sampled" in reasons


def test_round_with_only_bad_updates_keeps_the_global_adapter():
    strategy = FedIT(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3)
    _, messages = _configured(strategy)
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
    arrays, metrics = strategy.aggregate_train(1, [_reply_to(messages[11], content)])
    assert arrays is None
    assert metrics["num-rejected"] == 1


def test_constructor_rejects_bad_settings():
    import pytest

    with pytest.raises(ValueError, match="fraction-train"):
        FedIT(lora_alpha=8.0, fraction_train=0.0)
    with pytest.raises(ValueError, match="max-num-examples"):
        FedIT(lora_alpha=8.0, max_num_examples=0)


def test_round_below_the_minimum_reply_fraction_is_abandoned():
    strategy = FedIT(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                     min_reply_fraction=0.6)
    _, messages = _configured(strategy)
    good = random_adapter(np.random.default_rng(2), {"m": 2})
    replies = [_reply_to(messages[11], _update(good, 10)),
               Message(Error(code=1, reason="timed out"), reply_to=messages[12])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics["abandoned"] == 1.0
    strategy2 = FedIT(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                      min_reply_fraction=0.3)
    _, messages = _configured(strategy2)
    arrays, _ = strategy2.aggregate_train(1, [_reply_to(messages[11], _update(good, 10))])
    assert arrays is not None
