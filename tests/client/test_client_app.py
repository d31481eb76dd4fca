"""The ClientApp's train handler, called directly with Flower messages (no Flower running)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import BUDGET_ERROR_CODE, POLICY_ERROR_CODE, prepare_adapter, train
from client.partition import node_partition
from strategies.codec import state_to_record
from strategies.instructions import ClientInstructions
from strategies.parts import ALL_PARTS, EXTRAS, LORA_A, LORA_B, part_of, select_parts
from task import runtime as runtime_module
from task.runtime import cached_runtime
from task.settings import TaskSettings
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.usefixtures("task_identity")


def _context(run_config, partition_id=0, num_partitions=2, **node_config):
    node_config = {k.replace("_", "-"): v for k, v in node_config.items()}
    return Context(run_id=42, node_id=5, node_config={"partition-id": partition_id,
                                                       "num-partitions": num_partitions,
                                                       **node_config},
                   state=RecordDict(), run_config=run_config)


def _train_message(run_config, server_round=1, *, train=ALL_PARTS, send=ALL_PARTS,
                   private=frozenset(), download=ALL_PARTS):
    settings = TaskSettings.from_run_config(run_config)
    adapter = cached_runtime(settings).initial_adapter
    instructions = ClientInstructions(
        server_round=server_round, strategy="fedit", rank=settings.lora.lora_rank,
        alpha=settings.lora.lora_alpha, train_parts=frozenset(train), send_parts=frozenset(send),
        private_parts=frozenset(private))
    content = RecordDict({
        "arrays": state_to_record(select_parts(adapter.to_state_dict(), download)),
        "config": ConfigRecord(instructions.to_config())})
    return Message(content=content, message_type="train", dst_node_id=5), adapter


def test_train_reply_carries_the_trained_adapter_and_metrics(tiny_bert_dir, toy_csv):
    config = tiny_run_config(tiny_bert_dir, toy_csv)
    message, sent = _train_message(config)
    reply = train(message, _context(config))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 96  # half of the 192 training examples (iid)
    assert metrics["steps"] == 3
    arrays = reply.content["arrays"]
    assert set(arrays) == set(sent.to_state_dict())
    changed = [k for k in arrays if not np.array_equal(arrays[k].numpy(), sent.to_state_dict()[k])]
    assert any(part_of(k) == LORA_B for k in changed)


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


def test_ffa_client_never_trains_or_sends_a(tiny_bert_dir, toy_csv):
    config = tiny_run_config(tiny_bert_dir, toy_csv)
    parts = {LORA_B, EXTRAS}
    message, sent = _train_message(config, train=parts, send=parts, download=parts)
    assert not any(part_of(k) == LORA_A for k in message.content["arrays"])
    reply = train(message, _context(config))
    assert {part_of(k) for k in reply.content["arrays"]} == parts
    runtime = cached_runtime(TaskSettings.from_run_config(config))
    after = runtime.get_adapter()
    for name, factors in after.modules.items():  # A unchanged, bit for bit
        np.testing.assert_array_equal(factors.A, sent.modules[name].A)
    assert any(not np.array_equal(after.modules[m].B, sent.modules[m].B) for m in after.modules)
    assert all(p.requires_grad for n, p in runtime.model.named_parameters() if ".lora_A." in n
               and ".default." in n)  # frozen only during training


def test_private_parts_stay_on_the_client_across_rounds(tiny_bert_dir, toy_csv):
    config = tiny_run_config(tiny_bert_dir, toy_csv)
    context = _context(config)
    shared = {LORA_A, EXTRAS}
    message, _ = _train_message(config, send=shared, download=shared, private={LORA_B})
    reply = train(message, context)
    assert not any(part_of(k) == LORA_B for k in reply.content["arrays"])
    stored = {k: a.numpy() for k, a in
              context.state.array_records["fedlora.private-adapter.r4"].items()}
    assert stored and all(part_of(k) == LORA_B for k in stored)
    assert any(np.abs(v).sum() > 0 for v in stored.values())  # B was trained
    # next round: the client's own B is loaded, not the (zero) initial one
    next_message, _ = _train_message(config, server_round=2, send=shared, download=shared,
                                     private={LORA_B})
    runtime = cached_runtime(TaskSettings.from_run_config(config))
    instructions = ClientInstructions.from_config(next_message.content["config"])
    prepare_adapter(runtime, next_message.content["arrays"], instructions, context)
    loaded = runtime.get_adapter().to_state_dict()
    for key, value in stored.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_received_keys_the_model_lacks_are_an_error(tiny_bert_dir, toy_csv):
    config = tiny_run_config(tiny_bert_dir, toy_csv)
    message, _ = _train_message(config)
    message.content["arrays"]["evil.lora_A.weight"] = message.content["arrays"][
        next(iter(message.content["arrays"]))]
    with pytest.raises(ValueError, match="keys this model does not have"):
        train(message, _context(config))


def test_instructions_cannot_send_a_private_part():
    with pytest.raises(ValueError, match="private and must never be sent"):
        ClientInstructions(server_round=1, strategy="fedit", rank=4, alpha=8.0,
                           send_parts=ALL_PARTS, private_parts=frozenset({LORA_B}))


def test_node_config_without_partition_says_how_to_fix():
    with pytest.raises(ValueError, match="--node-config"):
        node_partition({})
    with pytest.raises(ValueError, match="partition-id 3 must be in"):
        node_partition({"partition-id": 3, "num-partitions": 2})


def test_dp_client_reports_cumulative_epsilon_and_refuses_past_its_budget(tiny_bert_dir,
                                                                          toy_csv):
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "dp": True, "dp-noise-multiplier": 1.0, "dp-delta": 1e-3, "num-rounds": 3})
    context = _context(config)
    first = train(_train_message(config, server_round=1)[0], context)
    second = train(_train_message(config, server_round=2)[0], context)
    eps1, eps2 = (m.content["metrics"]["dp-epsilon"] for m in (first, second))
    assert 0 < eps1 < eps2  # cumulative over rounds: the ledger lives in context.state
    context.run_config["dp-epsilon-budget"] = eps2  # any further round exceeds it
    refused = train(_train_message(config, server_round=3)[0], context)
    assert refused.has_error() and "refused to train" in refused.error.reason


def test_dp_ledger_file_keeps_epsilon_across_runs_of_the_node(tiny_bert_dir, toy_csv,
                                                               tmp_path):
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "dp": True, "dp-noise-multiplier": 1.0, "dp-delta": 1e-3, "num-rounds": 3})
    ledger_file = tmp_path / "node" / "ledger.json"

    def context():
        ctx = _context(config)
        ctx.node_config["dp-ledger-file"] = str(ledger_file)
        return ctx

    first_run = context()
    eps1 = train(_train_message(config, server_round=1)[0], first_run
                 ).content["metrics"]["dp-epsilon"]
    assert ledger_file.stat().st_mode & 0o777 == 0o600
    # the server restarts: a new Flower run, a new (empty) context.state on the node
    eps2 = train(_train_message(config, server_round=2)[0], context()
                 ).content["metrics"]["dp-epsilon"]
    uninterrupted = _context(config)  # no file: both rounds in one run's state
    for server_round in (1, 2):
        reference = train(_train_message(config, server_round=server_round)[0], uninterrupted)
    assert eps2 > eps1
    assert eps2 == pytest.approx(reference.content["metrics"]["dp-epsilon"], rel=1e-12)
    ledger_file.write_text("{torn")
    with pytest.raises(ValueError, match="cannot be read"):
        train(_train_message(config, server_round=3)[0], context())


# --- the server as the attacker ------------------------------------------------------------

def _dp_config(tiny_bert_dir, toy_csv, **extra):
    return tiny_run_config(tiny_bert_dir, toy_csv, **{
        "dp": True, "dp-noise-multiplier": 1.0, "dp-delta": 1e-3, "num-rounds": 3, **extra})


def _arrays(reply):
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def test_the_server_cannot_regenerate_the_dp_noise_by_default(tiny_bert_dir, toy_csv):
    # The server knows the seed, the round and the partition; with the old per-round seed
    # the same settings gave the same update, so it could regenerate (and subtract) the
    # noise. By default two identical requests now give different updates.
    config = _dp_config(tiny_bert_dir, toy_csv)
    node = {"dp-ledger": "run"}
    message, _ = _train_message(config, server_round=1)
    first = train(message, _context(config, **node))
    second = train(message, _context(config, **node))
    assert any(not np.array_equal(a, _arrays(second)[k]) for k, a in _arrays(first).items())
    for reply in (first, second):  # the partition id no longer travels in clear metrics
        assert "partition-id" not in reply.content["metrics"]
    # reproducible only on the run's explicit request, and only where the node allows it
    repro = _dp_config(tiny_bert_dir, toy_csv, **{"dp-reproducible": True})
    message, _ = _train_message(repro, server_round=1)
    refused = train(message, _context(repro, **node))
    assert refused.has_error() and "dp-allow-reproducible=true" in refused.error.reason
    allowed = {**node, "dp-allow-reproducible": True}
    a = train(message, _context(repro, **allowed))
    b = train(message, _context(repro, **allowed))
    for key, value in _arrays(a).items():
        np.testing.assert_array_equal(value, _arrays(b)[key])


def test_the_ledger_outlives_the_run_and_the_node_caps_epsilon_whatever_the_server_says(
        tiny_bert_dir, toy_csv, node_state_dir):
    # Each Flower run has a fresh Context; without dp-ledger-file epsilon used to restart at
    # 0, and without dp-epsilon-budget a node never refused.
    config = _dp_config(tiny_bert_dir, toy_csv)
    eps1 = train(_train_message(config, server_round=1)[0], _context(config)
                 ).content["metrics"]["dp-epsilon"]
    files = list((node_state_dir / "dp-ledgers").iterdir())
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert files[0].parent.stat().st_mode & 0o077 == 0
    eps2 = train(_train_message(config, server_round=1)[0], _context(config)  # a new run
                 ).content["metrics"]["dp-epsilon"]
    assert eps2 > eps1
    # a new run that asks for no budget and almost no noise: refused by the node's cap
    greedy = _dp_config(tiny_bert_dir, toy_csv, **{"dp-noise-multiplier": 0.05,
                                                   "dp-epsilon-budget": 0.0})
    refused = train(_train_message(greedy, server_round=1)[0], _context(greedy))
    assert refused.has_error() and refused.error.code == BUDGET_ERROR_CODE
    assert "the node's dp-max-epsilon 10" in refused.error.reason
    # the node's own, lower cap holds against the server's normal request too
    capped = {"dp-max-epsilon": eps2 * 1.01}
    refused = train(_train_message(config, server_round=1)[0], _context(config, **capped))
    assert refused.has_error() and f"dp-max-epsilon {eps2 * 1.01:g}" in refused.error.reason
    # nothing was spent by the refusals: the ledger still reads eps2
    nothing_spent = _context(config, **{"dp-max-epsilon": 1000.0})
    eps3 = train(_train_message(config, server_round=1)[0], nothing_spent
                 ).content["metrics"]["dp-epsilon"]
    assert eps3 > eps2
    reference = _context(config, **{"dp-ledger": "run"})  # a simulation's per-run ledger
    for server_round in (1, 2, 3):
        last = train(_train_message(config, server_round=server_round)[0], reference)
    assert last.content["metrics"]["dp-epsilon"] == pytest.approx(eps3, rel=1e-12)
    fresh = train(_train_message(config, server_round=1)[0], _context(config, dp_ledger="run"))
    assert fresh.content["metrics"]["dp-epsilon"] == pytest.approx(eps1, rel=1e-12)


def test_the_node_refuses_instructions_outside_its_bounds(tiny_bert_dir, toy_csv):
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{"num-rounds": 20})
    message, _ = _train_message(config)  # rank 4, alpha 8
    cases = [({"max-lora-alpha": 4}, "max-lora-alpha 4"),
             ({"max-num-rounds": 10}, "num-rounds 20, above this node's max-num-rounds 10"),
             ({"dp-required": True}, "dp-required=true")]
    for node, reason in cases:
        reply = train(message, _context(config, **node))
        assert reply.has_error() and reply.error.code == POLICY_ERROR_CODE, node
        assert reason in reply.error.reason
    dp = _dp_config(tiny_bert_dir, toy_csv, **{"dp-target-epsilon": 20.0})
    reply = train(_train_message(dp)[0], _context(dp))
    assert reply.has_error() and "dp-target-epsilon 20, above this node's dp-max-epsilon 10" \
        in reply.error.reason


def test_a_target_epsilon_is_spread_over_the_servers_default_num_rounds(tiny_bert_dir,
                                                                         toy_csv):
    from privacy.accounting import noise_for_target
    from task.dp_training import dp_sample_rate

    config = _dp_config(tiny_bert_dir, toy_csv, **{"dp-target-epsilon": 5.0})
    del config["num-rounds"]  # the server's default (5), not 1
    reply = train(_train_message(config)[0], _context(config, **{"dp-ledger": "run"}))
    rate = dp_sample_rate(96, TaskSettings.from_run_config(config).train)
    expected = noise_for_target(target_epsilon=5.0, delta=1e-3, sample_rate=rate, steps=5 * 3)
    assert reply.content["metrics"]["dp-noise-multiplier"] == pytest.approx(expected)


def test_a_node_asking_for_secure_mode_without_torchcsprng_refuses(tiny_bert_dir, toy_csv):
    from task.dp_training import secure_rng_available

    if secure_rng_available():
        pytest.skip("torchcsprng is installed")
    config = _dp_config(tiny_bert_dir, toy_csv)
    reply = train(_train_message(config)[0], _context(config, **{"dp-secure-mode": True}))
    assert reply.has_error() and reply.error.code == POLICY_ERROR_CODE
    assert "torchcsprng" in reply.error.reason and "dp-secure-mode=true" in reply.error.reason
