"""The secure-aggregation wrapper and client mod, run in-process against a fake grid.

Ten clients, threshold six: the sum survives four dropouts at either late stage, a fifth
aborts the round; what the server receives from a client is uniform in the ring.
"""

import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from scipy import stats

from privacy.secagg_config import SecureAggregationConfig
from privacy.secagg_flower import (
    MASKED_KEY,
    SECAGG_TYPE,
    SecureAggregation,
    answer_query,
    secure_aggregation_mod,
)
from strategies.codec import adapter_to_record, record_to_adapter
from strategies.config import ConfigError
from strategies.fedit import FedIT
from strategies.flexlora import FlexLoRA
from tests.conftest import random_adapter

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = list(range(101, 111))
ROUNDING = SecureAggregationConfig().rounding_error()


class Run:
    run_id = 7


class FakeGrid:
    """Delivers messages to in-process clients; ``gone[node]`` is the stage it drops at."""

    def __init__(self, nodes, handler, gone=None, node_config=None, corrupt=None):
        self.nodes, self.handler, self.gone = nodes, handler, dict(gone or {})
        self.corrupt = corrupt or {}
        self.run = Run()
        self.contexts = {n: Context(run_id=7, node_id=n, node_config=dict(node_config or {}),
                                    state=RecordDict(), run_config={}) for n in nodes}
        self.received: list[Message] = []  # everything the server receives

    def get_node_ids(self):
        return list(self.nodes)

    def _stage(self, message):
        if message.metadata.message_type == SECAGG_TYPE:
            from privacy.secagg_protocol import decode
            return decode(message.content.config_records["fedlora.secagg"]["payload"])["stage"]
        return "masked-input"

    def send_and_receive(self, messages, timeout=None):
        replies = []
        order = ["setup", "share-keys", "masked-input", "unmask"]
        for message in messages:
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_run_id"] = 7
            stage = self._stage(message)
            if node in self.gone and order.index(stage) >= order.index(self.gone[node]):
                continue  # the node has dropped out
            context = self.contexts[node]
            if message.metadata.message_type == SECAGG_TYPE:
                reply = answer_query(message, context)
            else:
                reply = secure_aggregation_mod(message, context, self.handler)
            if node in self.corrupt and stage == "masked-input":
                self.corrupt[node](reply)
            self.received.append(reply)
            replies.append(reply)
        return replies


def small_adapter(seed, in_f=4, out_f=3, rank=2, scale=0.2):
    """A random adapter with values well inside the clip range (1.0)."""
    adapter = random_adapter(np.random.default_rng(seed), {"m": rank}, in_f=in_f, out_f=out_f)
    state = {k: np.clip(v * scale, -0.8, 0.8) for k, v in adapter.to_state_dict().items()}
    return type(adapter).from_state_dict(state, adapter.alpha)


def deltas(node):
    return 0.01 * (node - 100)


def examples(node):
    return 10 * (node - 100)


def local_update(message, context):
    """Each node adds its own delta to every array and reports its own example count."""
    node = context.node_id
    arrays = message.content["arrays"]
    out = ArrayRecord({k: type(v)(v.numpy() + deltas(node)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": out, "metrics": MetricRecord({
        "num-examples": examples(node), "train-loss": 1.0 + 0.1 * (node - 100)})}),
        reply_to=message)


def secure_fedit(threshold=6, **config):
    inner = FedIT(lora_alpha=8.0, min_train_nodes=len(NODES), min_available_nodes=len(NODES))
    return SecureAggregation(inner, SecureAggregationConfig(
        secure_aggregation=True, secagg_threshold=threshold, **config))


def run_round(strategy, grid, adapter):
    messages = strategy.configure_train(1, adapter_to_record(adapter), ConfigRecord(), grid)
    return strategy.aggregate_train(1, grid.send_and_receive(messages))


def expected_mean(adapter, contributors):
    """By hand: the global plus the example-weighted mean of the contributors' deltas."""
    n = np.array([examples(u) for u in contributors], dtype=np.float64)
    shift = float((n * [deltas(u) for u in contributors]).sum() / n.sum())
    return {k: v + shift for k, v in adapter.to_state_dict().items()}, n


def check(arrays, adapter, contributors):
    expected, _ = expected_mean(adapter, contributors)
    got = record_to_adapter(arrays, 8.0).to_state_dict()
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=ROUNDING + 1e-6)


@pytest.mark.parametrize("drops", [0, 1, 2, 3, 4])
def test_dropouts_after_the_masked_input_still_give_the_whole_sum(drops):
    adapter = small_adapter(0)
    grid = FakeGrid(NODES, local_update, gone={n: "unmask" for n in NODES[:drops]})
    strategy = secure_fedit()
    arrays, metrics = run_round(strategy, grid, adapter)
    check(arrays, adapter, NODES)  # every input was summed, the dropped ones too
    assert metrics["num-accepted"] == 10
    assert metrics["secagg-dropouts-recovered"] == drops
    assert metrics["train-loss"] == pytest.approx(
        np.average([1.0 + 0.1 * (u - 100) for u in NODES], weights=expected_mean(
            adapter, NODES)[1]), abs=1e-2)


@pytest.mark.parametrize("drops", [1, 2, 4])
def test_dropouts_after_sharing_keys_leave_the_survivors_sum(drops):
    adapter = small_adapter(1)
    grid = FakeGrid(NODES, local_update, gone={n: "masked-input" for n in NODES[-drops:]})
    strategy = secure_fedit()
    arrays, metrics = run_round(strategy, grid, adapter)
    check(arrays, adapter, NODES[:-drops])
    assert metrics["num-accepted"] == 10 - drops
    details = strategy.inner.history[1].details["secure_aggregation"]
    assert details["recovered"] == {"self-masks": 10 - drops, "dropped-keys": drops}


@pytest.mark.parametrize("stage", ["masked-input", "unmask"])
def test_five_dropouts_abort_and_keep_the_global_adapter(stage, caplog):
    adapter = small_adapter(2)
    grid = FakeGrid(NODES, local_update, gone={n: stage for n in NODES[:5]})
    strategy = secure_fedit()
    with caplog.at_level(logging.WARNING):
        arrays, metrics = run_round(strategy, grid, adapter)
    assert arrays is None and metrics["abandoned"] == 1.0
    reason = strategy.inner.history[1].details["secure_aggregation"]["aborted"]
    assert "secagg-threshold 6 needed" in reason
    assert "secure aggregation aborted" in caplog.text and "unchanged" in caplog.text


def test_a_malformed_masked_input_is_rejected_and_its_masks_recovered():
    adapter = small_adapter(3)

    def truncate(reply):
        record = reply.content.array_records["arrays"]
        record[MASKED_KEY] = type(record[MASKED_KEY])(record[MASKED_KEY].numpy()[:-1])

    grid = FakeGrid(NODES, local_update, corrupt={NODES[0]: truncate})
    strategy = secure_fedit()
    arrays, metrics = run_round(strategy, grid, adapter)
    check(arrays, adapter, NODES[1:])
    assert metrics["num-rejected"] == 1
    assert "masked input of shape (28,)" in strategy.inner.history[1].rejections[0][1]


def test_what_the_server_receives_is_uniform_and_holds_no_update():
    """Zero updates are the easiest to spot; masked, every value is uniform in Z_2^32."""
    adapter = small_adapter(4, in_f=64, out_f=64, rank=4)

    def zero_update(message, context):
        arrays = message.content["arrays"]
        out = ArrayRecord({k: type(v)(np.zeros_like(v.numpy())) for k, v in arrays.items()})
        return Message(RecordDict({"arrays": out, "metrics": MetricRecord(
            {"num-examples": 1})}), reply_to=message)

    grid = FakeGrid(NODES, zero_update)
    run_round(secure_fedit(), grid, adapter)
    masked = [r.content.array_records["arrays"][MASKED_KEY].numpy() for r in grid.received
              if r.has_content() and r.content.array_records]
    assert len(masked) == 10
    for vector in masked:
        assert vector.dtype == np.uint32
        assert stats.kstest(vector / 2**32, "uniform").pvalue > 1e-4
        # and no two clients' inputs are related: their difference is uniform too
    assert stats.kstest((masked[0] - masked[1]) / 2**32, "uniform").pvalue > 1e-4
    for reply in grid.received:  # the metrics in clear: the rank only, if anything
        for record in reply.content.metric_records.values() if reply.has_content() else []:
            assert set(record) <= {"rank"}


def test_values_beyond_the_clip_range_are_clipped_and_counted():
    adapter = small_adapter(6, scale=0.0)  # all zero; the updates add 0.01..0.10
    grid = FakeGrid(NODES, local_update)
    strategy = secure_fedit(secagg_clip_range=0.055)
    arrays, metrics = run_round(strategy, grid, adapter)
    size = sum(v.size for v in adapter.to_state_dict().values())
    assert metrics["secagg-clipped-values"] == 5 * size  # nodes 106..110 exceed 0.055
    n = np.array([examples(u) for u in NODES], dtype=np.float64)
    clipped = np.minimum([deltas(u) for u in NODES], 0.055)
    got = record_to_adapter(arrays, 8.0).to_state_dict()
    for value in got.values():
        np.testing.assert_allclose(value, (n * clipped).sum() / n.sum(), atol=1e-6)


def test_nonlinear_strategies_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="not linear in the factors"):
        SecureAggregation(FlexLoRA(lora_alpha=8.0), SecureAggregationConfig(True))


def test_a_node_that_requires_it_refuses_a_plain_round():
    adapter = small_adapter(5)
    inner = FedIT(lora_alpha=8.0, min_train_nodes=2, min_available_nodes=2)
    grid = FakeGrid([1, 2], local_update, node_config={"require-secure-aggregation": "true"})
    arrays, metrics = run_round(inner, grid, adapter)
    assert arrays is None and metrics["num-failed"] == 2
    assert "requires it" in inner.history[1].failures[0][1]


def trained_parts(message, context):
    """A client that returns only the parts it is told to send, each moved by its delta."""
    from strategies.instructions import ClientInstructions
    from strategies.parts import select_parts

    instructions = ClientInstructions.from_config(message.content["config"])
    node = context.node_id
    state = {k: v.numpy() + deltas(node) for k, v in message.content["arrays"].items()}
    out = select_parts(state, instructions.send_parts)
    return Message(RecordDict({"arrays": ArrayRecord({k: type(message.content["arrays"][k])(v)
                                                      for k, v in out.items()}),
                               "metrics": MetricRecord({"num-examples": examples(node),
                                                        "rank": instructions.rank})}),
                   reply_to=message)


@pytest.mark.parametrize("name, config", [
    ("fedit", {}), ("ffa-lora", {}), ("fedsa-lora", {}),
    ("hetlora", {"client-ranks": "1,2,4,4,2,1,1,2,4,3", "hetlora-weighting": "data-size",
                 "hetlora-threshold": 0.0}),
    ("slora", {"slora-density": 0.5}),
])
def test_secure_round_equals_the_plain_round_for_every_supported_strategy(name, config):
    """Same clients, same grid: the secure aggregate is the plain one within the encoding."""
    from strategies import get_strategy_class
    from strategies.registry import strategy_config

    def build():
        return get_strategy_class(name)(
            lora_alpha=8.0, config=strategy_config(name, config), min_train_nodes=10,
            min_available_nodes=10)

    adapter = small_adapter(7, in_f=6, out_f=5, rank=4)
    plain = build()
    expected, _ = run_round(plain, FakeGrid(NODES, trained_parts), adapter)
    secure = SecureAggregation(build(), SecureAggregationConfig(True, secagg_threshold=6))
    got, metrics = run_round(secure, FakeGrid(NODES, trained_parts), adapter)
    assert metrics["num-accepted"] == 10
    a, b = record_to_adapter(expected, 8.0), record_to_adapter(got, 8.0)
    assert a.to_state_dict().keys() == b.to_state_dict().keys()
    for key, value in a.to_state_dict().items():
        np.testing.assert_allclose(b.to_state_dict()[key], value, rtol=0,
                                   atol=ROUNDING + 1e-6, err_msg=key)
    if name == "hetlora":
        assert secure.inner.history[1].client_ranks == plain.history[1].client_ranks


def test_a_rank_above_what_was_sent_is_rejected():
    adapter = small_adapter(8)

    def inflated_rank(message, context):
        reply = trained_parts(message, context)
        if context.node_id == NODES[0]:
            reply.content["metrics"]["rank"] = 64
        return reply

    strategy = secure_fedit()
    arrays, metrics = run_round(strategy, FakeGrid(NODES, inflated_rank), adapter)
    assert metrics["num-rejected"] == 1 and metrics["num-accepted"] == 9
    assert "rank 64 is above the 2" in strategy.inner.history[1].rejections[0][1]


def test_a_client_with_more_examples_than_the_cap_weighs_as_the_cap(caplog):
    from privacy.secagg_flower import summand

    arrays = {"a": np.ones((2, 3), np.float32)}
    with caplog.at_level(logging.WARNING):
        values, weight = summand(arrays, {}, [("a", (4, 3))], clip_norm=0.0,
                                 num_examples=5000, max_weight=1024)
    assert weight == 1024 and "weigh as secagg-max-weight 1024" in caplog.text
    assert values.shape == (12,) and values[6:].sum() == 0  # zero-padded to the global shape
    values, weight = summand(arrays, {"a": np.zeros((2, 3))}, [("a", (2, 3))],
                             clip_norm=0.5, num_examples=5000, max_weight=1024)
    assert weight == 1 and np.linalg.norm(values) == pytest.approx(0.5)  # DP: own clip
