"""FedEx-LoRA: FedIT's averaged factors plus the residual folded into the base (exact)."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from strategies.codec import adapter_to_record, record_to_adapter
from strategies.fedex_lora import FedExLoRA
from strategies.fedit import fedit_aggregate
from strategies.sparse import dense_key
from tests.conftest import random_adapter

pytestmark = pytest.mark.usefixtures("task_identity")
NODES = (1, 2, 3)


class FakeGrid:
    def get_node_ids(self):
        return list(NODES)


def _round(strategy, global_adapter, updates, counts, server_round=1):
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        server_round, adapter_to_record(global_adapter), ConfigRecord(), FakeGrid())}
    replies = [Message(RecordDict({"arrays": adapter_to_record(u),
                                   "metrics": MetricRecord({"num-examples": n})}),
                       reply_to=messages[node])
               for node, u, n in zip(NODES, updates, counts, strict=True)]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return record_to_adapter(arrays, global_adapter.alpha), metrics, messages


def _effective(adapter, name):
    """What a client's model adds to W0 for one module: base delta + s B A."""
    f = adapter.modules[name]
    delta = adapter.extras.get(dense_key(name), 0.0)
    return delta + adapter.scale(name) * (f.B.astype(np.float64) @ f.A.astype(np.float64))


def test_the_effective_update_is_exactly_the_average_of_the_clients():
    rng = np.random.default_rng(0)
    strategy = FedExLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                         update_min_cosine=-1.0, update_norm_bound=0.0)
    g = random_adapter(rng, {"m": 2, "n": 2})
    updates = [random_adapter(rng, {"m": 2, "n": 2}) for _ in NODES]
    counts = [10, 30, 60]
    new, metrics, _ = _round(strategy, g, updates, counts)
    p = np.array(counts) / 100
    fedit = fedit_aggregate(updates, counts)
    for name in ("m", "n"):
        # the factors are FedIT's, bit for bit
        np.testing.assert_allclose(new.modules[name].A, fedit.modules[name].A, rtol=1e-6)
        expected = sum(w * u.scale(name) * (u.modules[name].B.astype(np.float64)
                                            @ u.modules[name].A)
                       for w, u in zip(p, updates, strict=True))
        np.testing.assert_allclose(_effective(new, name), expected, rtol=1e-5, atol=1e-5)
        fedit_effective = _effective(fedit, name)
        assert np.linalg.norm(fedit_effective - expected) > 0.1 * np.linalg.norm(expected)
    assert metrics["agg-error-max"] < 1e-6 < metrics["residual-norm-mean"]
    assert metrics["base-delta-bytes"] == 2 * 5 * 6 * 4  # two 5 x 6 float32 deltas


def test_residuals_accumulate_and_every_client_downloads_them():
    rng = np.random.default_rng(1)
    strategy = FedExLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                         update_min_cosine=-1.0, update_norm_bound=0.0)
    g = random_adapter(rng, {"m": 2})
    first = [random_adapter(rng, {"m": 2}) for _ in NODES]
    g1, _, _ = _round(strategy, g, first, [1, 1, 1])
    second = [random_adapter(rng, {"m": 2}) for _ in NODES]
    g2, _, messages = _round(strategy, g1, second, [1, 1, 1], server_round=2)
    sent = messages[1].content["arrays"]
    assert dense_key("m") in sent  # the clients' base moves with the run
    np.testing.assert_array_equal(sent[dense_key("m")].numpy(), g1.extras[dense_key("m")])
    # round 2's effective model: the round-1 delta plus the exact average of round 2
    expected = g1.extras[dense_key("m")] + np.mean(
        [u.scale("m") * (u.modules["m"].B.astype(np.float64) @ u.modules["m"].A)
         for u in second], axis=0)
    np.testing.assert_allclose(_effective(g2, "m"), expected, rtol=1e-5, atol=1e-5)
    assert strategy.history[2].bytes_down > strategy.history[1].bytes_down  # the delta


def test_a_client_cannot_send_a_base_delta():
    rng = np.random.default_rng(2)
    strategy = FedExLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                         update_min_cosine=-1.0, update_norm_bound=0.0)
    g = random_adapter(rng, {"m": 2})
    g1, _, _ = _round(strategy, g, [random_adapter(rng, {"m": 2}) for _ in NODES], [1, 1, 1])
    forged = [random_adapter(rng, {"m": 2}) for _ in NODES]
    forged[0].extras[dense_key("m")] = np.full((5, 6), 1e3, np.float32)
    g2, metrics, _ = _round(strategy, g1, forged, [1, 1, 1], server_round=2)
    assert metrics["num-rejected"] == 1 and "extra" in strategy.history[2].rejections[0][1]


def test_refuses_what_would_break_exactness():
    with pytest.raises(ValueError, match="coordinate-wise median"):
        FedExLoRA(lora_alpha=8.0, aggregator="median")
