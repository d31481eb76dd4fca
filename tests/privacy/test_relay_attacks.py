"""The relay (SuperLink) as the attacker: each test is an attack that worked on the old code.

The relay stores and forwards every message, so it can read and rewrite anything in
clear, swap keys, strip the sealed payload, or hand a message over as another type. The
payload layer must make each of these fail with a logged reason, never silently succeed.
"""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from privacy.client_keys import AllowedClients, ClientIdentity, handshake_transcript
from privacy.flower import (
    HANDSHAKE_TYPE,
    HELLO_KEY,
    SEALED_KEY,
    STATE_KEY,
    EncryptedStrategy,
    handshake,
)
from privacy.keys import ServerIdentity
from privacy.transport import EphemeralKey, PayloadRejected
from strategies.codec import adapter_to_record, record_to_adapter
from strategies.fedit import FedIT
from tests.conftest import random_adapter
from tests.privacy.test_flower_wiring import FakeGrid, local_update

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = [1, 2, 3]


@pytest.fixture
def client_keys(tmp_path):
    """One signing key per node, saved where its node config points, and the allow-list."""
    files, identities = {}, {}
    for node in NODES:
        identity = ClientIdentity.generate()
        files[node] = identity.save(tmp_path / f"client-{node}.key")
        identities[node] = identity
    allowed = AllowedClients([i.public_key_bytes for i in identities.values()])
    return files, identities, allowed


def signed_grid(client_keys, handler=None, **kwargs):
    files, _, _ = client_keys
    grid = FakeGrid(NODES, handler or local_update(1.0), **kwargs)
    for node in NODES:
        grid.contexts[node].node_config["client-key-file"] = str(files[node])
    return grid


def strategy_with(allowed, **kwargs):
    inner = FedIT(lora_alpha=8.0, min_train_nodes=len(NODES), min_available_nodes=len(NODES),
                  **kwargs)
    return EncryptedStrategy(inner, ServerIdentity.generate(), allowed_clients=allowed)


def adapter():
    return random_adapter(np.random.default_rng(0), {"m": 2})


def run_round(strategy, grid):
    messages = strategy.configure_train(1, adapter_to_record(adapter()), ConfigRecord(), grid)
    return strategy.aggregate_train(1, grid.send_and_receive(messages))


def reasons(strategy, server_round=1):
    return [r for _, r in strategy.transport_rejections.get(server_round, [])]


# ------------------------------------------------------------------ impersonation


def test_signed_clients_are_admitted(client_keys):
    strategy = strategy_with(client_keys[2])
    arrays, metrics = run_round(strategy, signed_grid(client_keys))
    assert metrics["num-accepted"] == 3 and arrays is not None


def test_relay_swapping_a_client_key_cannot_pose_as_that_node(client_keys):
    """The relay answers node 2's handshake with its own ephemeral key (old code: accepted,
    the relay then opened node 2's copy of the global adapter and sealed a forged update)."""
    relay_key = EphemeralKey()

    def swap(node, reply):
        if node == 2 and HELLO_KEY in reply.content.config_records:
            reply.content.config_records[HELLO_KEY]["client-ephemeral"] = \
                relay_key.public_key_bytes

    strategy = strategy_with(client_keys[2])
    grid = signed_grid(client_keys, tamper=swap)
    messages = list(strategy.configure_train(1, adapter_to_record(adapter()), ConfigRecord(),
                                             grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 3]  # nothing sealed for it
    assert any("bad handshake signature" in r for r in reasons(strategy))


def test_unsigned_and_unknown_handshakes_are_refused(client_keys, tmp_path):
    stranger = ClientIdentity.generate().save(tmp_path / "stranger.key")
    grid = signed_grid(client_keys)
    del grid.contexts[1].node_config["client-key-file"]  # node 1 does not sign
    grid.contexts[2].node_config["client-key-file"] = str(stranger)  # a key not admitted
    strategy = strategy_with(client_keys[2], min_reply_fraction=0.0)
    messages = list(strategy.configure_train(1, adapter_to_record(adapter()), ConfigRecord(),
                                             grid))
    assert [m.metadata.dst_node_id for m in messages] == [3]
    got = reasons(strategy)
    assert any("unsigned handshake" in r for r in got)
    assert any("is not in the allowed keys" in r for r in got)


def test_one_key_speaks_for_one_node(client_keys):
    files, _, allowed = client_keys
    grid = signed_grid(client_keys)
    grid.contexts[2].node_config["client-key-file"] = str(files[1])  # node 2 reuses 1's key
    strategy = strategy_with(allowed)
    messages = list(strategy.configure_train(1, adapter_to_record(adapter()), ConfigRecord(),
                                             grid))
    admitted = sorted(m.metadata.dst_node_id for m in messages)
    assert admitted in ([1, 3], [2, 3])  # whichever of 1 and 2 answered first keeps the key
    assert any("already speaks for node" in r for r in reasons(strategy))


def test_a_signature_from_another_round_does_not_verify(client_keys):
    _, identities, allowed = client_keys
    ephemeral = EphemeralKey()
    server, server_eph = ServerIdentity.generate(), EphemeralKey()
    common = dict(message_type="train", node_id=1, server_key=server.public_key_bytes,
                  server_ephemeral=server_eph.public_key_bytes,
                  client_ephemeral=ephemeral.public_key_bytes, run_id=42)
    signature = identities[1].sign(handshake_transcript(round=1, **common))
    with pytest.raises(ValueError, match="bad handshake signature"):
        allowed.verify(public_key=identities[1].public_key_bytes, signature=signature,
                       transcript=handshake_transcript(round=2, **common), node_id=1)


# ------------------------------------------------------------------ downgrade


def test_relay_stripping_the_seal_gets_no_plaintext_update():
    """The relay replaces the sealed payload by plain arrays; the client refuses to train
    (old code: it trained and sent its update back in clear)."""
    def strip(node, message):
        if message.metadata.message_type == HANDSHAKE_TYPE:
            return message
        content = RecordDict({k: v for k, v in message.content.items()
                              if k not in (SEALED_KEY, HELLO_KEY)})
        content["arrays"] = adapter_to_record(adapter())
        return Message(content, dst_node_id=node, message_type=message.metadata.message_type)

    strategy = EncryptedStrategy(FedIT(lora_alpha=8.0, min_train_nodes=2,
                                       min_available_nodes=2))
    grid = FakeGrid([1, 2], local_update(0.0), relay=strip)
    messages = strategy.configure_train(1, adapter_to_record(adapter()), ConfigRecord(), grid)
    with pytest.raises(PayloadRejected, match="requires encryption"):
        grid.send_and_receive(messages)


# ------------------------------------------------------------- what travels in clear


def test_rewritten_example_count_is_rejected(client_keys):
    """num-examples 10 -> 1e6 would make the aggregate that node's update alone."""
    def inflate(node, reply):
        if node == 2 and "metrics" in reply.content.metric_records:
            reply.content.metric_records["metrics"]["num-examples"] = 1_000_000

    strategy = strategy_with(client_keys[2])
    arrays, metrics = run_round(strategy, signed_grid(client_keys, tamper=inflate))
    assert metrics["num-accepted"] == 2
    assert reasons(strategy) == ["authentication failed"]


def test_rewritten_instructions_are_refused_by_the_client(client_keys):
    """The relay raises the rank the server asked for; the node refuses the message."""
    def raise_rank(node, message):
        if message.metadata.message_type == MessageType.TRAIN and node == 1:
            message.content.config_records["config"]["adapter-rank"] = 64
        return message

    strategy = strategy_with(client_keys[2])
    grid = signed_grid(client_keys, relay=raise_rank)
    messages = strategy.configure_train(1, adapter_to_record(adapter()), ConfigRecord(), grid)
    with pytest.raises(PayloadRejected, match="authentication failed"):
        grid.send_and_receive(messages)


def test_a_train_payload_does_not_open_as_an_evaluate_message(client_keys):
    """Type confusion: the relay hands a sealed train message over as an evaluate one."""
    def retype(node, message):
        if message.metadata.message_type == MessageType.TRAIN:
            return Message(RecordDict(dict(message.content.items())), dst_node_id=node,
                           message_type=MessageType.EVALUATE)
        return message

    strategy = strategy_with(client_keys[2])
    grid = signed_grid(client_keys, relay=retype)
    messages = strategy.configure_train(1, adapter_to_record(adapter()), ConfigRecord(), grid)
    with pytest.raises(PayloadRejected, match="no evaluate handshake"):
        grid.send_and_receive(messages)


def test_a_train_reply_is_not_accepted_as_an_evaluation_reply(client_keys):
    strategy = strategy_with(client_keys[2], fraction_evaluate=1.0, min_evaluate_nodes=3)
    grid = signed_grid(client_keys)
    messages = strategy.configure_train(1, adapter_to_record(adapter()), ConfigRecord(), grid)
    train_replies = grid.send_and_receive(messages)
    evaluate = strategy.configure_evaluate(1, adapter_to_record(adapter()), ConfigRecord(), grid)
    forged = [Message(RecordDict(dict(r.content.items())), reply_to=e)
              for r, e in zip(train_replies, evaluate, strict=True)]
    assert strategy.aggregate_evaluate(1, forged) is None
    assert all("train reply" in r or "authentication failed" in r
               for r in reasons(strategy))


def test_tampered_evaluation_metrics_are_left_out(client_keys):
    def evaluator(message, context):
        from flwr.app import MetricRecord
        return Message(RecordDict({"metrics": MetricRecord(
            {"num-examples": 10, "eval-accuracy": 0.5})}), reply_to=message)

    def boost(node, reply):
        metrics = reply.content.metric_records.get("metrics")
        if node == 3 and metrics is not None and "eval-accuracy" in metrics:
            metrics["eval-accuracy"] = 1.0

    strategy = strategy_with(client_keys[2], fraction_evaluate=1.0, min_evaluate_nodes=3)
    grid = signed_grid(client_keys, evaluator, tamper=boost)
    messages = strategy.configure_evaluate(1, adapter_to_record(adapter()), ConfigRecord(), grid)
    result = strategy.aggregate_evaluate(1, grid.send_and_receive(messages))
    assert result["fed-eval-accuracy"] == pytest.approx(0.5)
    assert reasons(strategy) == ["authentication failed"]


# ------------------------------------------------------------------ pinning


def hello(server: ServerIdentity, server_round: int = 1) -> Message:
    record = ConfigRecord({"server-key": server.public_key_bytes,
                           "server-ephemeral": EphemeralKey().public_key_bytes,
                           "round": server_round, "message-type": "train"})
    return Message(RecordDict({HELLO_KEY: record}), dst_node_id=1, message_type=HANDSHAKE_TYPE)


def fresh_context(**node_config) -> Context:
    return Context(run_id=42, node_id=1, node_config=dict(node_config), state=RecordDict(),
                   run_config={})


def test_first_use_pin_persists_across_runs_and_refuses_a_new_server_key(node_state_dir):
    """Old code trusted whatever key arrived in each round and remembered none."""
    server = ServerIdentity.generate()
    handshake(hello(server), fresh_context())
    pin = node_state_dir / "server-key.pin"
    assert pin.read_text().strip() == server.fingerprint()
    assert pin.stat().st_mode & 0o077 == 0
    handshake(hello(server, 2), fresh_context())  # a later run, a new Context: same key ok
    with pytest.raises(PayloadRejected, match="server key changed"):
        handshake(hello(ServerIdentity.generate()), fresh_context())


def test_memory_pin_refuses_a_key_change_within_a_run():
    context = fresh_context(**{"server-pin-file": ""})
    handshake(hello(ServerIdentity.generate()), context)
    with pytest.raises(PayloadRejected, match="untrusted server"):
        handshake(hello(ServerIdentity.generate(), 2), context)


# ------------------------------------------------------------------ forward secrecy


def test_no_round_key_survives_the_round(client_keys):
    """Old code kept every round's keys for the whole run when fraction-evaluate was 0."""
    strategy = strategy_with(client_keys[2])
    grid = signed_grid(client_keys)
    for server_round in (1, 2, 3):
        messages = strategy.configure_train(server_round, adapter_to_record(adapter()),
                                            ConfigRecord(), grid)
        assert strategy.live_keys == 1
        strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        assert strategy.live_keys == 0
        assert list(strategy.configure_evaluate(server_round, adapter_to_record(adapter()),
                                                ConfigRecord(), grid)) == []
        assert strategy.live_keys == 0
    for context in grid.contexts.values():  # nor does a client's ephemeral key
        assert not [k for k in context.state.config_records if k.startswith(STATE_KEY)]


def test_evaluation_keys_are_dropped_after_evaluation(client_keys):
    strategy = strategy_with(client_keys[2], fraction_evaluate=1.0, min_evaluate_nodes=3)
    grid = signed_grid(client_keys)
    evaluate = strategy.configure_evaluate(1, adapter_to_record(adapter()), ConfigRecord(), grid)
    assert strategy.live_keys == 1
    replies = grid.send_and_receive(evaluate)
    strategy.aggregate_evaluate(1, replies)
    assert strategy.live_keys == 0


def test_sealed_reply_without_arrays_still_opens(client_keys):
    strategy = strategy_with(client_keys[2])
    grid = signed_grid(client_keys)
    arrays, _ = run_round(strategy, grid)
    assert record_to_adapter(arrays, 8.0).modules["m"].A.shape == (2, 6)
    assert isinstance(arrays, ArrayRecord)
