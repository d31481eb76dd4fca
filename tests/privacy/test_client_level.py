"""Client-level DP on the server (privacy/client_level.py), driven with mock messages.

Clipping against hand-computed values, the aggregate against FedIT with uniform weights
and against Flower's own DP-FedAvg wrapper, the noise's std and where it goes, faulty
replies under DP, and the accountant against Opacus' RDP accountant. No Ray.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from opacus.accountants import RDPAccountant

from privacy.client_level import (
    CLIPPED_METRIC,
    EPSILON_METRIC,
    NOISE_STD_METRIC,
    ClientLevelDP,
    clip_update,
)
from server.run import build_strategy
from strategies.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX, LoraAdapter
from strategies.base import LoraStrategy
from strategies.codec import adapter_to_record, record_to_adapter
from strategies.fedit import FedIT, fedit_aggregate
from strategies.fedsa import FedSALoRA
from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.hetlora import HetLoRA, HetLoRAConfig
from strategies.hetlora_math import hetlora_aggregate, pad_adapter
from strategies.slora import SLoRA, SLoRAConfig
from strategies.validation import ClientUpdate
from task.run_settings import FederationSettings, RunSettings
from tests.conftest import random_adapter
from tests.strategies.test_faults_unit import COUNT_REASONS, FAULTS, content

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = (11, 12, 13, 14)
HEAD = "base_model.model.classifier.weight"
GLOBAL = random_adapter(np.random.default_rng(0), {"layer.0.query": 4, "layer.0.value": 4})
ALPHA = 8.0


class FakeGrid:
    def __init__(self, nodes=NODES):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def dp(noise: float = 0.0, clip: float = 1.0, **kwargs) -> ClientLevelDP:
    return ClientLevelDP(noise_multiplier=noise, clip_norm=clip, **kwargs)


def common(nodes=NODES, **kwargs) -> dict:
    return {"lora_alpha": ALPHA, "min_train_nodes": len(nodes),
            "min_available_nodes": len(nodes), **kwargs}


def configure(strategy, server_round=1, adapter=GLOBAL, grid=None) -> dict[int, Message]:
    messages = strategy.configure_train(server_round, adapter_to_record(adapter), ConfigRecord(),
                                        grid or FakeGrid())
    return {m.metadata.dst_node_id: m for m in messages}


def received(message: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in message.content["arrays"].items()}


def moved(message: Message, node_id: int, scale: float) -> dict[str, np.ndarray]:
    """What the node was sent, moved by ``scale`` times a node-seeded standard normal."""
    rng = np.random.default_rng(node_id)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in received(message).items()}


def reply(message: Message, state: dict[str, np.ndarray], n: int = 10) -> Message:
    return Message(content(state, n), reply_to=message)


def aggregate(strategy, replies, server_round=1) -> LoraAdapter | None:
    arrays, _ = strategy.aggregate_train(server_round, list(replies))
    return None if arrays is None else record_to_adapter(arrays, ALPHA)


def states(adapter: LoraAdapter) -> dict[str, np.ndarray]:
    return adapter.to_state_dict()


# ------------------------------------------------------------------------------- clipping


def test_clip_scales_a_change_of_norm_five_by_one_fifth():
    reference = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[0.5]], np.float32)}
    update = {"a": np.array([4.0, 2.0], np.float32), "b": np.array([[4.5]], np.float32)}
    clipped, norm, factor = clip_update(update, reference, clip_norm=1.0)
    # change (3, 0, 4) over both tensors: norm 5, scaled by 1/5 to (0.6, 0, 0.8)
    assert norm == 5.0 and factor == 0.2
    np.testing.assert_allclose(clipped["a"], [1.6, 2.0], rtol=1e-7)
    np.testing.assert_allclose(clipped["b"], [[1.3]], rtol=1e-7)
    assert clipped["a"].dtype == np.float32


def test_clip_leaves_a_change_within_the_bound_untouched():
    reference = {"a": np.array([1.0, 2.0], np.float32)}
    update = {"a": np.array([1.3, 2.4], np.float32)}  # change (0.3, 0.4): norm 0.5
    clipped, norm, factor = clip_update(update, reference, clip_norm=1.0)
    assert factor == 1.0 and norm == pytest.approx(0.5, rel=1e-6)
    assert clipped["a"] is update["a"]


def test_clip_compares_a_lower_rank_factor_with_the_leading_block_it_was_sent():
    sent_a = np.arange(6, dtype=np.float32).reshape(3, 2)  # rank 3
    pruned = sent_a[:2].copy()  # the client kept rank 2
    pruned[1, 1] += 10.0
    clipped, norm, factor = clip_update({"A": pruned}, {"A": sent_a}, clip_norm=2.0)
    assert norm == 10.0 and factor == 0.2
    expected = sent_a[:2].copy()
    expected[1, 1] += 2.0
    np.testing.assert_array_equal(clipped["A"], expected)


def test_strategy_clips_each_update_and_averages_with_uniform_weights():
    strategy = FedIT(**common(nodes=(11, 12)), client_dp=dp(noise=0.0, clip=1.0))
    messages = configure(strategy, grid=FakeGrid((11, 12)))
    sent = received(messages[11])
    key = sorted(sent)[0]
    big, small = dict(sent), dict(sent)
    big[key] = sent[key].copy()
    big[key][0, 0] += 5.0  # norm 5: scaled to 1
    small[key] = sent[key].copy()
    small[key][0, 1] += 0.5  # norm 0.5: kept
    result = aggregate(strategy, [reply(messages[11], big, n=900),
                                  reply(messages[12], small, n=1)])
    expected = dict(sent)
    expected[key] = sent[key].astype(np.float64)
    expected[key][0, 0] += 1.0 / 2
    expected[key][0, 1] += 0.5 / 2
    for k, value in states(result).items():
        np.testing.assert_allclose(value, expected[k], rtol=0, atol=1e-6)
    metrics = strategy.history[1].metrics
    assert metrics[CLIPPED_METRIC] == 0.5 and metrics[NOISE_STD_METRIC] == 0.0
    assert EPSILON_METRIC not in metrics  # no noise: no epsilon to report


def test_noise_zero_and_a_huge_clip_is_fedit_with_uniform_weights():
    counts = {11: 40, 12: 25, 13: 20, 14: 35}
    strategy = FedIT(**common(), client_dp=dp(noise=0.0, clip=1e9))
    messages = configure(strategy)
    sent = {n: moved(messages[n], n, 0.3) for n in NODES}
    result = aggregate(strategy, [reply(messages[n], sent[n], counts[n]) for n in NODES])
    adapters = [LoraAdapter.from_state_dict(sent[n], ALPHA) for n in NODES]
    uniform = fedit_aggregate(adapters, [1] * len(NODES))
    weighted = fedit_aggregate(adapters, [counts[n] for n in NODES])
    for key, value in states(result).items():
        np.testing.assert_allclose(value, states(uniform)[key], rtol=1e-6, atol=1e-7)
    assert not np.allclose(states(result)[HEAD], states(weighted)[HEAD], atol=1e-4)
    assert strategy.history[1].metrics[CLIPPED_METRIC] == 0.0


# ------------------------------------------------------------- Flower's own DP-FedAvg


def test_equals_flowers_server_side_fixed_clipping_on_honest_fedit_replies():
    clip = 1.0
    scales = {11: 0.03, 12: 0.3, 13: 0.1, 14: 0.2}  # change norms about 0.3, 3, 1, 2

    def run(strategy) -> dict[str, np.ndarray]:
        messages = configure(strategy)
        replies = [reply(messages[n], moved(messages[n], n, scales[n]), 10) for n in NODES]
        return states(aggregate(strategy, replies))

    ours = FedIT(**common(), client_dp=dp(noise=0.0, clip=clip))
    mine = run(ours)
    theirs = run(DifferentialPrivacyServerSideFixedClipping(FedIT(**common()), 0.0, clip, 4))
    clipped = ours.history[1].metrics[CLIPPED_METRIC]
    assert 0.0 < clipped < 1.0  # both paths of the clipping are exercised
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        np.testing.assert_allclose(value, theirs[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["wrong-shape-fedit", "honest-ffa-lora"])
def test_replies_that_crash_flowers_wrapper_are_handled_here(case):
    cls = FFALoRA if case == "honest-ffa-lora" else FedIT

    def replies_for(messages):
        out = []
        for n in NODES:
            state = moved(messages[n], n, 0.1)
            if case == "wrong-shape-fedit" and n == 13:
                state[HEAD] = np.zeros((7, 7), np.float32)
            out.append(reply(messages[n], state))
        return out

    flower = DifferentialPrivacyServerSideFixedClipping(cls(**common()), 0.0, 1.0, 4)
    with pytest.raises(ValueError, match="could not be broadcast"):
        flower.aggregate_train(1, replies_for(configure(flower)))

    ours = cls(**common(), client_dp=dp(noise=1.0, clip=1.0))
    result = aggregate(ours, replies_for(configure(ours)))
    assert result is not None
    stats = ours.history[1]
    if case == "wrong-shape-fedit":
        assert stats.accepted == 3
        assert stats.rejections == [(13, f"{HEAD}: shape (7, 7) does not fit the expected "
                                         "(3, 6)")]
    else:
        assert stats.accepted == 4 and stats.rejected == 0


# ------------------------------------------------------------------------------- noise

BIG = random_adapter(np.random.default_rng(5), {"m": 8}, in_f=4, out_f=12_500)  # B: 100k


@pytest.mark.parametrize(("cls", "noisy", "untouched"), [
    (FFALoRA, "m" + LORA_B_SUFFIX, "m" + LORA_A_SUFFIX),
    (FedSALoRA, "m" + LORA_A_SUFFIX, "m" + LORA_B_SUFFIX),
])
def test_noise_has_std_sigma_c_over_m_on_sent_parts_only(cls, noisy, untouched):
    sigma, clip = 2.0, 0.5  # std on the average: 2 * 0.5 / 4 = 0.25
    strategy = cls(**common(), client_dp=dp(noise=sigma, clip=clip, seed=3))
    messages = configure(strategy, adapter=BIG)
    result = states(aggregate(strategy, [reply(messages[n], received(messages[n]))
                                         for n in NODES]))
    before = BIG.to_state_dict()
    noise = result[noisy].astype(np.float64) - before[noisy]
    assert np.all(noise != 0) and np.all(result[HEAD] != before[HEAD])
    if cls is FFALoRA:  # B holds 100k numbers; FedSA's A only 32
        assert noise.size == 100_000
        assert abs(noise.std() / 0.25 - 1.0) < 0.03
        assert abs(noise.mean()) < 4 * 0.25 / math.sqrt(noise.size)
    np.testing.assert_array_equal(result[untouched], before[untouched])  # bit for bit
    assert strategy.history[1].metrics[NOISE_STD_METRIC] == 0.25


def test_noise_is_reproducible_from_seed_and_round():
    def run(seed, server_round):
        strategy = FFALoRA(**common(), client_dp=dp(noise=1.0, seed=seed))
        messages = configure(strategy, server_round=server_round)
        return states(aggregate(strategy, [reply(messages[n], received(messages[n]))
                                           for n in NODES], server_round=server_round))

    key = "layer.0.query" + LORA_B_SUFFIX
    np.testing.assert_array_equal(run(0, 1)[key], run(0, 1)[key])
    assert not np.array_equal(run(0, 1)[key], run(0, 2)[key])
    assert not np.array_equal(run(0, 1)[key], run(1, 1)[key])


def test_secure_seed_draws_noise_that_the_run_seed_does_not_fix():
    mechanism = dp(noise=1.0, secure_seed=True)
    draws = [mechanism.generator(1).standard_normal(4) for _ in range(2)]
    assert not np.array_equal(*draws)
    assert "OS CSPRNG" in mechanism.describe()


# ------------------------------------------------------------------------ faulty replies


@pytest.mark.parametrize("fault", sorted(FAULTS) + sorted(COUNT_REASONS))
def test_a_faulty_reply_is_rejected_and_the_noisy_aggregate_is_the_honest_ones(fault):
    def run(with_fault):
        strategy = FedIT(**common(max_num_examples=1_000),
                         client_dp=dp(noise=1.0, clip=0.5, seed=9))
        messages = configure(strategy)
        replies = [reply(messages[n], moved(messages[n], n, 0.1)) for n in (11, 12, 14)]
        if with_fault:
            state = moved(messages[13], 13, 0.1)
            if fault in FAULTS:
                faulty = FAULTS[fault].build(state)
            else:
                faulty = content(state, COUNT_REASONS[fault][0])
            replies.insert(2, Message(faulty, reply_to=messages[13]))
        return strategy, aggregate(strategy, replies)

    faulty, with_fault = run(True)
    honest, without = run(False)  # node 13 sampled but silent: same m, same noise
    assert faulty.history[1].rejected == 1 and faulty.history[1].rejections[0][0] == 13
    for key, value in states(with_fault).items():
        np.testing.assert_array_equal(value, states(without)[key])
    assert faulty.history[1].metrics[EPSILON_METRIC] == honest.history[1].metrics[EPSILON_METRIC]


# ---------------------------------------------------------------------------- accounting


def opacus_epsilon(noise: float, rate: float, rounds: int, delta: float = 1e-5) -> float:
    reference = RDPAccountant()
    for _ in range(rounds):
        reference.step(noise_multiplier=noise, sample_rate=rate)
    return reference.get_epsilon(delta=delta)


def test_epsilon_matches_opacus_rdp_for_sigma_1_q_0_1_over_100_rounds():
    # 1 of 10 nodes sampled per round: q = 0.1. Opacus' bound at q < 1 takes ~0.1 s, so
    # the strategy runs 5 rounds and the mechanism's ledger is charged for the other 95.
    strategy = FedIT(lora_alpha=ALPHA, fraction_train=0.1, min_train_nodes=1,
                     min_available_nodes=1, client_dp=dp(noise=1.0, clip=1.0, delta=1e-5))
    small = random_adapter(np.random.default_rng(1), {"m": 1}, in_f=2, out_f=2, head=False)
    epsilons = []
    for server_round in range(1, 6):
        messages = configure(strategy, server_round, small, FakeGrid(tuple(range(1, 11))))
        (node, message), = messages.items()
        aggregate(strategy, [reply(message, moved(message, node, 0.1))], server_round)
        epsilons.append(strategy.history[server_round].metrics[EPSILON_METRIC])
        assert strategy.history[server_round].available == 10
    assert epsilons[-1] == pytest.approx(opacus_epsilon(1.0, 0.1, 5), rel=1e-9)
    assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))

    for _ in range(95):
        strategy.client_dp.record_release(sampled=1, accepted=1, available=10)
    assert strategy.client_dp.epsilon() == pytest.approx(opacus_epsilon(1.0, 0.1, 100),
                                                         rel=1e-9)


def test_a_short_round_counts_with_the_noise_it_actually_had():
    strategy = FedIT(**common(), client_dp=dp(noise=1.2))
    messages = configure(strategy)
    aggregate(strategy, [reply(messages[n], moved(messages[n], n, 0.1)) for n in (11, 12, 13)])
    # noise 1.2 C / 4 on an average of 3: the sum of 3 clipped changes got noise 0.9 C
    epsilon = strategy.history[1].metrics[EPSILON_METRIC]
    assert epsilon == pytest.approx(opacus_epsilon(0.9, 1.0, 1), rel=1e-9)


def test_a_round_without_a_release_costs_nothing():
    strategy = FedIT(**common(min_reply_fraction=0.75), client_dp=dp(noise=1.0))
    configure(strategy)
    assert aggregate(strategy, []) is None  # nobody replied
    assert strategy.history[1].metrics[EPSILON_METRIC] == 0.0
    messages = configure(strategy, 2)
    assert aggregate(strategy, [reply(messages[11], received(messages[11]))], 2) is None
    assert strategy.history[2].metrics["abandoned"] == 1.0  # 1 of 4 is below 0.75
    assert strategy.history[2].metrics[EPSILON_METRIC] == 0.0
    assert strategy.client_dp.ledger.history == []


def test_state_dict_round_trip_keeps_counting_epsilon():
    def make():
        return FedIT(**common(), client_dp=dp(noise=1.0, seed=4))

    def run_round(strategy, server_round):
        messages = configure(strategy, server_round)
        result = aggregate(strategy, [reply(messages[n], moved(messages[n], n, 0.1))
                                      for n in NODES], server_round)
        return result, strategy.history[server_round].metrics[EPSILON_METRIC]

    first = make()
    for server_round in (1, 2, 3):
        run_round(first, server_round)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed.client_dp.epsilon() == first.client_dp.epsilon() > 0
    straight, eps_straight = run_round(first, 4)
    again, eps_again = run_round(resumed, 4)
    assert eps_again == eps_straight > first.history[3].metrics[EPSILON_METRIC]
    for key, value in states(again).items():
        np.testing.assert_array_equal(value, states(straight)[key])

    without_dp = FedIT(**common())
    with pytest.raises(ValueError, match="the saved run did not use it"):
        make().load_state_dict(without_dp.state_dict())


# ----------------------------------------------------------------- every linear strategy

RANKS = (4, 2, 3, 1)  # node order 11..14


def build(name: str, client_dp: ClientLevelDP | None):
    kwargs = common(client_dp=client_dp)
    if name == "fedit":
        return FedIT(**kwargs)
    if name == "ffa-lora":
        return FFALoRA(**kwargs)
    if name == "fedsa-lora":
        return FedSALoRA(**kwargs)
    if name == "hetlora":
        return HetLoRA(config=HetLoRAConfig(client_ranks=",".join(map(str, RANKS)),
                                     hetlora_weighting="data-size"), **kwargs)
    if name.startswith("slora"):
        return SLoRA(config=SLoRAConfig(slora_rounds=1, slora_density=0.2,
                                             slora_then="ffa-lora"), **kwargs)
    raise AssertionError(name)


LINEAR = ("fedit", "ffa-lora", "fedsa-lora", "hetlora", "slora-stage-1", "slora-stage-2")


def round_of(name: str) -> int:
    return 2 if name == "slora-stage-2" else 1


def run_linear(name: str, client_dp: ClientLevelDP | None) -> tuple[LoraStrategy, dict]:
    strategy = build(name, client_dp)
    server_round = round_of(name)
    messages = configure(strategy, server_round)
    replies = []
    for n in NODES:  # the parts the node sends back (SLoRA's stage 2 receives A, keeps it)
        state = moved(messages[n], n, 0.05)
        replies.append(reply(messages[n], {k: state[k] for k in strategy.sent_tensors(n)}, 10))
    result = aggregate(strategy, replies, server_round)
    assert strategy.history[server_round].accepted == len(NODES)
    return strategy, states(result)


@pytest.mark.parametrize("name", LINEAR)
def test_every_linear_strategy_without_noise_and_clipping_is_unchanged(name):
    _, plain = run_linear(name, None)
    _, private = run_linear(name, dp(noise=0.0, clip=1e9))
    assert plain.keys() == private.keys()
    for key, value in private.items():
        np.testing.assert_allclose(value, plain[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", LINEAR)
def test_every_linear_strategy_gets_noise_on_exactly_what_clients_send(name):
    strategy, plain = run_linear(name, None)
    _, private = run_linear(name, dp(noise=1.0, clip=1.0))
    sent = set(strategy.sent_tensors(NODES[0]))
    if name in ("fedit", "hetlora"):
        assert sent == set(plain)
    else:
        assert sent and sent < set(plain)
    for key, value in private.items():
        if key in sent:
            assert not np.allclose(value, plain[key]), key
        else:
            np.testing.assert_array_equal(value, plain[key])


def test_hetlora_clips_at_each_clients_own_rank_and_averages_uniformly():
    clip = 1.0
    strategy = HetLoRA(config=HetLoRAConfig(client_ranks="2,2,1,1"),
                       **common(client_dp=dp(noise=0.0, clip=clip)))
    assert strategy.weighting == "data-size"  # sparsity weights would leak: forced uniform
    messages = configure(strategy)
    sent = {n: received(messages[n]) for n in NODES}
    key_a = "layer.0.query" + LORA_A_SUFFIX
    replies, expected = [], []
    for n, jump in zip(NODES, (3.0, 0.5, 8.0, 0.2), strict=True):
        state = {k: v.copy() for k, v in sent[n].items()}
        if n == 12:  # pruned from rank 2 to 1: compared with the first row it was sent
            state = {k: (v[:1].copy() if k.endswith(LORA_A_SUFFIX) else
                         v[:, :1].copy() if k.endswith(LORA_B_SUFFIX) else v)
                     for k, v in state.items()}
        state[key_a][0, 0] += jump  # one entry moves: the change's norm is |jump|
        replies.append(reply(messages[n], state, n=10 * n))
        kept = {k: v.copy() for k, v in state.items()}
        kept[key_a][0, 0] -= jump - min(jump, clip)  # clipped by hand
        expected.append(LoraAdapter.from_state_dict(kept, ALPHA))
    result = aggregate(strategy, replies)
    reference = hetlora_aggregate([pad_adapter(a, 4) for a in expected], np.full(4, 0.25), 4)
    for key, value in states(result).items():
        np.testing.assert_allclose(value, states(reference)[key], rtol=1e-6, atol=1e-7)
    assert strategy.history[1].metrics[CLIPPED_METRIC] == 0.5
    assert strategy.ranks[12] == 1


def test_hetlora_noise_stays_within_the_ranks_clients_trained():
    strategy = HetLoRA(config=HetLoRAConfig(client_ranks="2,2,1,1"),
                       **common(client_dp=dp(noise=1.0)))
    messages = configure(strategy)
    result = states(aggregate(strategy, [reply(messages[n], received(messages[n]))
                                         for n in NODES]))
    factors = result["layer.0.value" + LORA_A_SUFFIX], result["layer.0.value" + LORA_B_SUFFIX]
    assert np.all(factors[0][:2] != 0) and np.all(factors[0][2:] == 0)
    assert np.all(factors[1][:, :2] != 0) and np.all(factors[1][:, 2:] == 0)


# ------------------------------------------------------------------ refusals and settings


def test_flexlora_refuses_client_level_dp_naming_the_reason_and_the_alternatives():
    message = r"flexlora does not support client-level DP .*SVD.*use hetlora .* or fedit"
    with pytest.raises(ValueError, match=message):
        FlexLoRA(**common(client_dp=dp(noise=1.0)))
    with pytest.raises(ValueError, match=message):
        RunSettings.from_run_config({"strategy": "flexlora", "client-dp-noise": 1.0})
    FlexLoRA(**common())  # without client DP it builds


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"noise_multiplier": -0.1}, "client-dp-noise must be a finite number >= 0, got -0.1"),
    ({"noise_multiplier": 1.0, "clip_norm": 0.0}, "client-dp-clip .* must be positive, got 0"),
    ({"noise_multiplier": 1.0, "delta": 1.0}, re.escape("client-dp-delta must be in (0, 1)")),
    ({"noise_multiplier": 1.0, "delta": 0.0}, re.escape("client-dp-delta must be in (0, 1)")),
])
def test_bad_mechanism_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClientLevelDP(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"client_dp_noise": -1.0}, "client-dp-noise must be a finite number >= 0"),
    ({"client_dp_clip": -2.0}, "client-dp-clip .* must be positive, got -2.0"),
    ({"client_dp_delta": 2.0}, re.escape("client-dp-delta must be in (0, 1), got 2.0")),
])
def test_bad_run_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FederationSettings(**kwargs)


def test_build_strategy_passes_the_run_settings():
    off = build_strategy(RunSettings.from_run_config({}))
    assert off.client_dp is None
    on = build_strategy(RunSettings.from_run_config({
        "strategy": "ffa-lora", "client-dp-noise": "0.8", "client-dp-clip": 0.25,
        "client-dp-delta": 1e-6, "seed": 7}))
    mechanism = on.client_dp
    assert isinstance(mechanism, ClientLevelDP)
    assert (mechanism.noise_multiplier, mechanism.clip_norm, mechanism.delta,
            mechanism.seed, mechanism.secure_seed) == (0.8, 0.25, 1e-6, 7, True)
    hetlora = build_strategy(RunSettings.from_run_config({"strategy": "hetlora",
                                                          "client-dp-noise": 1.0}))
    assert hetlora.weighting == "data-size"


def test_round_metrics_reach_the_flower_metric_record():
    strategy = FedIT(**common(), client_dp=dp(noise=1.0, clip=0.01))
    messages = configure(strategy)
    _, metrics = strategy.aggregate_train(1, [reply(messages[n], moved(messages[n], n, 0.1))
                                              for n in NODES])
    assert metrics[CLIPPED_METRIC] == 1.0
    assert metrics[NOISE_STD_METRIC] == pytest.approx(0.01 / 4)
    assert metrics[EPSILON_METRIC] > 0


def test_an_update_with_a_tensor_that_was_not_sent_is_refused_before_aggregation():
    class Inner:
        count = 0

        def add(self, update):
            raise AssertionError("never reached")

    wrapped = dp(noise=1.0).wrap(Inner(), server_round=1, sampled=1, available=1,
                                 reference=lambda node: {"x": np.zeros(2, np.float32)})
    update = ClientUpdate(node_id=1, num_examples=1, state={"y": np.zeros(2, np.float32)},
                          metrics={}, adapter=LoraAdapter({}, 1.0))
    with pytest.raises(ValueError, match=re.escape("update tensors ['y'] were not sent")):
        wrapped.add(update)
