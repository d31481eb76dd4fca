"""The encryption wrapper and client mod, run in-process against a fake grid."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from privacy.flower import HANDSHAKE_TYPE, SEALED_KEY, EncryptedStrategy, encryption_mod, handshake
from privacy.keys import ServerIdentity
from strategies.codec import adapter_to_record, record_to_adapter
from strategies.fedit import FedIT
from tests.conftest import random_adapter

pytestmark = pytest.mark.usefixtures("task_identity")


class Run:
    run_id = 42


class FakeGrid:
    """Delivers messages to in-process 'clients' and records what crosses the relay."""

    def __init__(self, nodes, handler, tamper=None, node_config=None, relay=None):
        self.nodes = nodes
        self.handler = handler
        self.tamper = tamper
        self.relay = relay  # rewrites a message on its way to a node (returns the new one)
        self.run = Run()
        self.contexts = {n: Context(run_id=42, node_id=n, node_config=dict(node_config or {}),
                                    state=RecordDict(), run_config={}) for n in nodes}
        self.seen: list[RecordDict] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.seen.append(message.content)
            message.metadata.__dict__["_run_id"] = 42
            if self.relay is not None:
                message = self.relay(node, message)
                message.metadata.__dict__["_run_id"] = 42
            if message.metadata.message_type == HANDSHAKE_TYPE:
                reply = handshake(message, self.contexts[node])
            else:
                reply = encryption_mod(message, self.contexts[node], self.handler)
            self.seen.append(reply.content)
            if self.tamper is not None:
                self.tamper(node, reply)
            replies.append(reply)
        return replies


def local_update(delta):
    """A client that adds ``delta`` to every received array and reports 10 examples."""

    def handler(message, context):
        arrays = message.content["arrays"]
        out = ArrayRecord({k: type(v)(v.numpy() + delta) for k, v in arrays.items()})
        return Message(RecordDict({"arrays": out,
                                   "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=message)
    return handler


def _round(strategy, grid, adapter):
    messages = strategy.configure_train(1, adapter_to_record(adapter), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    return strategy.aggregate_train(1, replies)


def test_sealed_round_equals_plain_round_and_the_relay_sees_no_plaintext():
    adapter = random_adapter(np.random.default_rng(0), {"m": 2})
    plain = FedIT(lora_alpha=8.0, min_train_nodes=2, min_available_nodes=2)
    plain_grid = FakeGrid([1, 2], local_update(0.5), node_config={"require-encryption": False})
    expected, _ = plain.aggregate_train(1, plain_grid.send_and_receive(
        plain.configure_train(1, adapter_to_record(adapter), ConfigRecord(), plain_grid)))
    sealed = EncryptedStrategy(FedIT(lora_alpha=8.0, min_train_nodes=2,
                                     min_available_nodes=2), ServerIdentity.generate())
    grid = FakeGrid([1, 2], local_update(0.5))
    got, metrics = _round(sealed, grid, adapter)
    a, b = record_to_adapter(expected, 8.0), record_to_adapter(got, 8.0)
    for key, value in a.items():
        np.testing.assert_array_equal(b.to_state_dict()[key], value)
    assert metrics["num-accepted"] == 2
    secret = adapter.modules["m"].A.tobytes()
    for content in grid.seen:  # what the relay stored: no array, no plaintext bytes
        assert not content.array_records
        for record in content.config_records.values():
            for value in record.values():
                assert not (isinstance(value, bytes) and secret[:16] in value)


def test_tampered_and_replayed_replies_are_left_out():
    adapter = random_adapter(np.random.default_rng(0), {"m": 2})
    kept = {}

    def tamper(node, reply):
        if node == 2 and SEALED_KEY in reply.content.config_records:
            record = reply.content.config_records[SEALED_KEY]
            record["ciphertext"] = bytes([record["ciphertext"][0] ^ 1]) + record["ciphertext"][1:]
        if node == 3:
            kept["reply"] = reply

    inner = FedIT(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3)
    strategy = EncryptedStrategy(inner, ServerIdentity.generate())
    grid = FakeGrid([1, 2, 3], local_update(1.0), tamper=tamper)
    messages = strategy.configure_train(1, adapter_to_record(adapter), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    replay = Message(RecordDict(dict(kept["reply"].content.items())), reply_to=[
        m for m in messages if m.metadata.dst_node_id == 3][0])
    arrays, metrics = strategy.aggregate_train(1, [*replies, replay])
    assert metrics["num-accepted"] == 2
    reasons = [r for _, r in strategy.transport_rejections[1]]
    assert any("authentication failed" in r for r in reasons)
    assert any("replay" in r for r in reasons)


def test_plaintext_reply_is_rejected_when_encryption_is_on():
    adapter = random_adapter(np.random.default_rng(0), {"m": 2})

    def strip(node, reply):
        if SEALED_KEY in reply.content.config_records:
            del reply.content.config_records[SEALED_KEY]
            reply.content["arrays"] = adapter_to_record(adapter)

    strategy = EncryptedStrategy(FedIT(lora_alpha=8.0, min_train_nodes=2,
                                       min_available_nodes=2))
    grid = FakeGrid([1, 2], local_update(0.0), tamper=strip)
    arrays, metrics = _round(strategy, grid, adapter)
    assert arrays is None
    assert all("plaintext reply" in r for _, r in strategy.transport_rejections[1])


def test_client_refuses_a_server_that_does_not_match_its_pin():
    strategy = EncryptedStrategy(FedAvg(min_train_nodes=1, min_available_nodes=1))
    grid = FakeGrid([1], local_update(0.0))
    grid.contexts[1].node_config["server-key-pin"] = ServerIdentity.generate().fingerprint()
    with pytest.raises(ValueError, match="untrusted server"):
        strategy.configure_train(1, ArrayRecord({}), ConfigRecord(), grid)


def test_per_client_payloads_of_heterogeneous_ranks_are_sealed_per_node():
    from strategies.hetlora import HetLoRA, HetLoRAConfig

    adapter = random_adapter(np.random.default_rng(0), {"m": 4})
    inner = HetLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                    config=HetLoRAConfig(client_ranks="1,2,4"))
    strategy = EncryptedStrategy(inner)
    grid = FakeGrid([1, 2, 3], local_update(0.0))
    messages = strategy.configure_train(1, adapter_to_record(adapter), ConfigRecord(), grid)
    manifests = {m.metadata.dst_node_id: m.content.config_records[SEALED_KEY]["manifest"]
                 for m in messages}
    assert '"m.lora_A.weight",[1,6]' in manifests[1]  # rank 1 for node 1, sealed for it
    assert '"m.lora_A.weight",[4,6]' in manifests[3]
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert metrics["num-accepted"] == 3
    assert inner.history[1].client_ranks == {1: 1, 2: 2, 3: 4}
