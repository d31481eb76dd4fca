"""The ClientApp's train handler, called directly with Flower messages (no Flower running)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import train
from client.partition import node_partition
from strategies.wire import adapter_to_record, record_to_adapter
from task import runtime as runtime_module
from task.runtime import cached_runtime
from task.settings import TaskSettings
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.usefixtures("task_identity")


def _context(run_config, partition_id=0, num_partitions=2):
    return Context(run_id=42, node_id=5, node_config={"partition-id": partition_id,
                                                       "num-partitions": num_partitions},
                   state=RecordDict(), run_config=run_config)


def _train_message(run_config, server_round=1):
    settings = TaskSettings.from_run_config(run_config)
    adapter = cached_runtime(settings).initial_adapter
    content = RecordDict({"arrays": adapter_to_record(adapter),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, message_type="train", dst_node_id=5), adapter


def test_train_reply_carries_the_trained_adapter_and_metrics(tiny_bert_dir, toy_csv):
    config = tiny_run_config(tiny_bert_dir, toy_csv)
    message, sent = _train_message(config)
    reply = train(message, _context(config))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 96  # half of the 192 training examples (iid)
    assert metrics["steps"] == 3
    got = record_to_adapter(reply.content["arrays"], sent.alpha)
    assert got.ranks == sent.ranks
    assert any(not np.array_equal(got.modules[m].B, sent.modules[m].B) for m in got.modules)


def test_a_cached_client_returns_exactly_what_a_fresh_one_does(tiny_bert_dir, toy_csv):
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{"lora-dropout": 0.1})
    message, _ = _train_message(config, server_round=2)
    first = train(message, _context(config, partition_id=1))
    # the cached runtime has now trained; train again from the same message
    second = train(message, _context(config, partition_id=1))
    runtime_module._CACHE.clear()  # a freshly built client
    fresh_message, _ = _train_message(config, server_round=2)
    third = train(fresh_message, _context(config, partition_id=1))
    for key in first.content["arrays"]:
        a = first.content["arrays"][key].numpy()
        np.testing.assert_array_equal(a, second.content["arrays"][key].numpy())
        np.testing.assert_array_equal(a, third.content["arrays"][key].numpy())


def test_node_config_without_partition_says_how_to_fix():
    with pytest.raises(ValueError, match="--node-config"):
        node_partition({})
    with pytest.raises(ValueError, match="partition-id 3 must be in"):
        node_partition({"partition-id": 3, "num-partitions": 2})
