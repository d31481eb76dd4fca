"""FLoRA: the stacked clients' adapters merged into the base, a fresh adapter each round."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from strategies.codec import adapter_to_record, record_to_adapter
from strategies.flora import FLoRA, stack
from strategies.hetero import RankConfig
from strategies.hetlora_math import truncate_adapter
from strategies.sparse import dense_key
from tests.conftest import random_adapter

pytestmark = pytest.mark.usefixtures("task_identity")
NODES = (1, 2, 3)


class FakeGrid:
    def get_node_ids(self):
        return list(NODES)


def _round(strategy, global_adapter, make_update, counts, server_round=1):
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        server_round, adapter_to_record(global_adapter), ConfigRecord(), FakeGrid())}
    updates = {}
    for node in NODES:
        config = messages[node].content["config"]
        updates[node] = make_update(int(config["adapter-rank"]), float(config["adapter-alpha"]))
    replies = [Message(RecordDict({"arrays": adapter_to_record(updates[node]),
                                   "metrics": MetricRecord({"num-examples": n})}),
                       reply_to=messages[node]) for node, n in zip(NODES, counts, strict=True)]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return record_to_adapter(arrays, global_adapter.alpha), metrics, updates, messages


def test_stacking_is_the_weighted_sum_of_products_at_any_ranks():
    rng = np.random.default_rng(0)
    adapters = [random_adapter(rng, {"m": r}, alpha=8.0 * r / 4) for r in (1, 2, 4)]
    w = np.array([0.2, 0.3, 0.5])
    B, A = stack(adapters, w, "m")
    assert B.shape == (5, 7) and A.shape == (7, 6)  # ranks stack: 1 + 2 + 4
    expected = sum(wk * a.scale("m") * (a.modules["m"].B.astype(np.float64) @ a.modules["m"].A)
                   for wk, a in zip(w, adapters, strict=True))
    np.testing.assert_allclose(B @ A, expected, rtol=1e-12, atol=1e-12)


def test_heterogeneous_ranks_merge_exactly_and_restart_fresh():
    rng = np.random.default_rng(1)
    strategy = FLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                     config=RankConfig(client_ranks="1,2,4"), update_min_cosine=-1.0,
                     update_norm_bound=0.0)
    g = random_adapter(rng, {"m": 4})

    def update(rank, alpha):
        return random_adapter(rng, {"m": rank}, alpha=alpha)

    new, metrics, updates, messages = _round(strategy, g, update, [10, 30, 60])
    assert sorted(int(m.content["config"]["adapter-rank"]) for m in messages.values()) == [1, 2, 4]
    p = {1: 0.1, 2: 0.3, 3: 0.6}
    expected = sum(p[n] * u.scale("m") * (u.modules["m"].B.astype(np.float64) @ u.modules["m"].A)
                   for n, u in updates.items())
    np.testing.assert_allclose(new.extras[dense_key("m")], expected, rtol=1e-5, atol=1e-6)
    assert not new.modules["m"].B.any() and new.modules["m"].rank == 4  # fresh: B = 0
    assert np.abs(new.modules["m"].A).max() <= 1 / np.sqrt(6)  # Kaiming-uniform bound
    assert not np.array_equal(new.modules["m"].A, g.modules["m"].A)
    assert metrics["agg-error-max"] < 1e-6 and metrics["rank-sum"] == 7.0
    assert metrics["stacked-bytes"] == 4 * (5 * 7 + 7 * 6)


def test_merged_deltas_accumulate_and_clients_start_from_the_fresh_adapter():
    rng = np.random.default_rng(2)
    strategy = FLoRA(lora_alpha=8.0, min_train_nodes=3, min_available_nodes=3,
                     update_min_cosine=-1.0, update_norm_bound=0.0)
    g = random_adapter(rng, {"m": 2})

    def update(rank, alpha):
        return random_adapter(rng, {"m": rank}, alpha=alpha)

    g1, _, first, _ = _round(strategy, g, update, [1, 1, 1])
    g2, _, second, messages = _round(strategy, g1, update, [1, 1, 1], server_round=2)
    sent = record_to_adapter(messages[1].content["arrays"], 8.0)
    np.testing.assert_array_equal(sent.modules["m"].A, truncate_adapter(g1, 2).modules["m"].A)
    np.testing.assert_array_equal(sent.extras[dense_key("m")], g1.extras[dense_key("m")])
    expected = sum(u.scale("m") * (u.modules["m"].B.astype(np.float64) @ u.modules["m"].A)
                   for u in (*first.values(), *second.values())) / 3
    np.testing.assert_allclose(g2.extras[dense_key("m")], expected, rtol=1e-5, atol=1e-5)


def test_refuses_client_level_dp():
    class FakeDP:
        pass

    with pytest.raises(ValueError, match="client-level DP"):
        FLoRA(lora_alpha=8.0, client_dp=FakeDP())
