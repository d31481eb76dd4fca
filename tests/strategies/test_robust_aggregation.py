"""Robust aggregation in the strategies: malicious updates among honest ones.

Four nodes per round, as in test_faults_unit (the same global adapter, honest replies and
counts); node 13 attacks. An update the defences reject must leave the aggregate exactly
(bit for bit) what the honest replies alone give, with a reason in the round's stats;
the robust aggregators must match numpy computations over the replies.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message

import strategies.base as base_module
from privacy.client_level import ClientLevelDP
from strategies.base import LoraStrategy
from strategies.codec import record_to_adapter
from strategies.fedit import FedIT
from strategies.robust import RobustConfig, change_norm, pad_to
from task.run_settings import RunSettings
from tests.strategies.test_faults_unit import (
    COUNTS,
    FAULTY,
    GLOBAL,
    HONEST,
    NODES,
    STRATEGIES,
    assert_same_arrays,
    configure,
    content,
    honest_state,
    make_strategy,
)

pytestmark = pytest.mark.usefixtures("task_identity")

SCALED = 100.0


def sent_state(message: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in message.content["arrays"].items()}


def scaled_state(message: Message, node_id: int, factor: float) -> dict[str, np.ndarray]:
    """``sent + factor * (honest - sent)``: an honest update with its change scaled."""
    sent, honest = sent_state(message), honest_state(message, node_id)
    return {k: (sent[k] + factor * (honest[k] - sent[k])).astype(np.float32) for k in honest}


def play_round(name: str, attacker=None, *, strategy: LoraStrategy | None = None,
               nodes=NODES, **robust: object):
    """One round of ``nodes``' replies in node order; ``attacker(message)`` builds 13's content.

    Without ``attacker`` node 13 replies honestly if it is in ``nodes``.
    """
    strategy = strategy or make_strategy(name, **robust)
    messages = configure(strategy)
    replies = []
    for node in nodes:
        if node == FAULTY and attacker is not None:
            replies.append(Message(attacker(messages[node]), reply_to=messages[node]))
        else:
            replies.append(Message(content(honest_state(messages[node], node), COUNTS[node],
                                           0.01 * node), reply_to=messages[node]))
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, messages, arrays, metrics


def huge(message: Message):
    """Every value 1e30, one example: finite, so it passes validation."""
    return content({k: np.full_like(v, 1e30) for k, v in sent_state(message).items()}, 1)


def assert_finite(arrays: ArrayRecord) -> None:
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


# ------------------------------------------------------------- rejected attacks


DEFENCES = {
    "defaults": ({}, "exceeds update-max-abs 10000"),
    "value-cap-only": ({"update_norm_bound": 0.0}, "exceeds update-max-abs 10000"),
    "norm-bound-only": ({"update_max_abs": 0.0}, "exceeds update-norm-bound 10 x the round's "
                                                 "median update norm"),
}


@pytest.mark.parametrize("defence", DEFENCES)
@pytest.mark.parametrize("name", STRATEGIES)
def test_a_1e30_update_with_one_example_is_rejected_and_the_aggregate_is_the_honest_one(
        name, defence):
    robust, reason = DEFENCES[defence]
    strategy, _, arrays, metrics = play_round(name, huge, **robust)
    _, _, honest, honest_metrics = play_round(name, nodes=HONEST, **robust)
    rejections = strategy.history[1].rejections
    assert [node for node, _ in rejections] == [FAULTY]
    assert reason in rejections[0][1], rejections
    assert (metrics["num-accepted"], metrics["num-rejected"]) == (3, 1)
    assert arrays is not None and honest is not None
    assert_finite(arrays)
    assert_same_arrays(arrays, honest)
    assert metrics["bytes-up"] == honest_metrics["bytes-up"]
    assert metrics["train-loss"] == honest_metrics["train-loss"]
    assert str(FAULTY) not in {str(n) for n in strategy.history[1].client_ranks}


def test_with_every_defence_off_a_non_finite_aggregate_is_not_published():
    """FlexLoRA's SVD of 1e30 factors overflows float32: the round is abandoned instead."""
    strategy, _, arrays, metrics = play_round("flexlora", huge, update_norm_bound=0.0,
                                              update_min_cosine=-1.0, update_max_abs=0.0)
    assert arrays is None and metrics["abandoned"] == 1.0
    assert strategy._global is not None
    assert all(np.isfinite(v).all() for _, v in strategy._global.items())


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_norm_bound_rejects_a_scaled_update_and_keeps_the_honest_ones(name):
    attack = lambda m: content(scaled_state(m, FAULTY, SCALED), COUNTS[FAULTY])  # noqa: E731
    strategy, messages, arrays, metrics = play_round(name, attack, update_max_abs=0.0)
    _, _, honest, honest_metrics = play_round(name, nodes=HONEST, update_max_abs=0.0)
    stats = strategy.history[1]
    assert [node for node, _ in stats.rejections] == [FAULTY]
    assert "exceeds update-norm-bound 10 x the round's median update norm" in \
        stats.rejections[0][1]
    assert (metrics["num-accepted"], metrics["num-rejected"]) == (3, 1)
    assert_same_arrays(arrays, honest)
    assert metrics["bytes-up"] == honest_metrics["bytes-up"]
    assert metrics["train-loss"] == honest_metrics["train-loss"]
    norms = stats.details["update_norms"]
    assert set(norms) == {str(n) for n in NODES}
    assert norms[str(FAULTY)] == pytest.approx(SCALED * np.median(
        [norms[str(n)] for n in HONEST]), rel=0.5)

    # a change 3x the others' is within the bound: accepted and aggregated
    mild = lambda m: content(scaled_state(m, FAULTY, 3.0), COUNTS[FAULTY])  # noqa: E731
    strategy, _, arrays, metrics = play_round(name, mild, update_max_abs=0.0)
    assert strategy.history[1].rejections == [] and metrics["num-accepted"] == 4


# ------------------------------------------------------------- robust aggregators


def padded_states(strategy: LoraStrategy, messages, nodes, attacker_state=None):
    """Per node, what it sent, zero-padded to the global rank (HetLoRA's padding)."""
    shapes = {k: v.shape for k, v in GLOBAL.to_state_dict().items()}
    states = {}
    for node in nodes:
        state = attacker_state if node == FAULTY and attacker_state is not None else \
            honest_state(messages[node], node)
        states[node] = {k: pad_to(v, shapes[k]) for k, v in state.items()}
    return states


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
@pytest.mark.parametrize("name", ["fedit", "ffa-lora", "hetlora"])
def test_median_and_trimmed_mean_resist_one_scaled_client_among_four(name, aggregator):
    """With the norm bound off, every coordinate stays within the honest clients' range."""
    attack = lambda m: content(scaled_state(m, FAULTY, SCALED), COUNTS[FAULTY])  # noqa: E731
    strategy, messages, arrays, _ = play_round(name, attack, aggregator=aggregator,
                                               update_norm_bound=0.0, update_min_cosine=-1.0)
    assert strategy.history[1].rejections == []
    got = record_to_adapter(arrays, 8.0).to_state_dict()
    honest = padded_states(strategy, messages, HONEST)
    for key in honest[HONEST[0]]:
        values = np.stack([honest[n][key] for n in HONEST])
        assert (got[key] >= values.min(axis=0) - 1e-6).all(), key
        assert (got[key] <= values.max(axis=0) + 1e-6).all(), key

    # the plain mean is dragged far outside that range by the same attack
    _, messages, arrays, _ = play_round(name, attack, update_norm_bound=0.0, update_min_cosine=-1.0)
    got = record_to_adapter(arrays, 8.0).to_state_dict()
    outside = sum(((got[k] < np.stack([honest[n][k] for n in HONEST]).min(axis=0) - 1e-3) |
                   (got[k] > np.stack([honest[n][k] for n in HONEST]).max(axis=0) + 1e-3)).sum()
                  for k in honest[HONEST[0]])
    assert outside > 0


@pytest.mark.parametrize("name", ["fedit", "ffa-lora", "hetlora"])
@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_coordinate_wise_aggregators_match_numpy(name, aggregator):
    """Four honest replies: the sent tensors are numpy's median / trimmed mean over clients
    (HetLoRA: zero-padded to the global rank); parts not sent stay the global's."""
    strategy, messages, arrays, _ = play_round(name, aggregator=aggregator)
    got = record_to_adapter(arrays, 8.0).to_state_dict()
    states = padded_states(strategy, messages, NODES)
    sent_keys = set(sent_state(messages[NODES[0]]))
    for key, value in got.items():
        if key not in sent_keys:  # FFA-LoRA's A
            np.testing.assert_array_equal(value, GLOBAL.to_state_dict()[key])
            continue
        stacked = np.stack([states[n][key].astype(np.float64) for n in NODES])
        if aggregator == "median":
            expected = np.median(stacked, axis=0)
        else:  # 4 values at 0.2: one dropped per side, the middle two averaged
            expected = np.sort(stacked, axis=0)[1:3].mean(axis=0)
        np.testing.assert_allclose(value, expected.astype(np.float32), rtol=1e-6, atol=1e-7)
    if name == "hetlora":  # the strategy's own bookkeeping still ran: each node's rank
        assert strategy.ranks == {11: 4, 12: 2, 13: 3, 14: 1}


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_norm_clip_matches_numpy(clip):
    """Each change clipped to ``clip`` (0: the median norm), counts capped at the median."""
    strategy, messages, arrays, metrics = play_round("fedit", aggregator="norm-clip",
                                                     clip_norm=clip)
    sent = {n: sent_state(messages[n]) for n in NODES}
    states = {n: honest_state(messages[n], n) for n in NODES}
    norms = {n: change_norm(states[n], sent[n]) for n in NODES}
    limit = clip or float(np.median(list(norms.values())))
    weights = {11: 30, 12: 25, 13: 20, 14: 30}  # 40, 25, 20, 35 capped at their median 30
    got = record_to_adapter(arrays, 8.0).to_state_dict()
    for key in states[11]:
        total = sum(weights[n] * (sent[n][key].astype(np.float64) + min(1.0, limit / norms[n])
                                  * (states[n][key] - sent[n][key].astype(np.float64)))
                    for n in NODES)
        np.testing.assert_allclose(got[key], (total / sum(weights.values())).astype(np.float32),
                                   rtol=1e-5, atol=1e-6)
    assert metrics["robust-clip-norm"] == pytest.approx(limit)
    clipped = sum(norms[n] > limit for n in NODES) / 4
    assert metrics["robust-clipped-fraction"] == clipped > 0


def test_norm_clip_works_for_flexlora_and_bounds_a_scaled_update():
    attack = lambda m: content(scaled_state(m, FAULTY, 5.0), COUNTS[FAULTY])  # noqa: E731
    strategy, _, arrays, metrics = play_round("flexlora", attack, aggregator="norm-clip")
    assert strategy.history[1].rejections == [] and metrics["num-accepted"] == 4
    assert metrics["robust-clipped-fraction"] >= 0.25
    assert_finite(arrays)


def test_mean_with_the_bound_on_equals_the_streaming_mean_bit_for_bit():
    """Holding the round changes nothing when nobody is rejected."""
    _, _, held, _ = play_round("fedit")
    _, _, streamed, _ = play_round("fedit", update_norm_bound=0.0, update_min_cosine=-1.0)
    assert_same_arrays(held, streamed)


def test_the_streaming_path_is_kept_when_the_bound_is_off(monkeypatch):
    class Refused(base_module.RobustRound):
        def __init__(self, *args, **kwargs):
            raise AssertionError("the round must stream")

    monkeypatch.setattr(base_module, "RobustRound", Refused)
    _, _, arrays, metrics = play_round("fedit", update_norm_bound=0.0, update_min_cosine=-1.0)
    assert arrays is not None and metrics["num-accepted"] == 4
    with pytest.raises(AssertionError, match="must stream"):
        play_round("fedit")


# ------------------------------------------------------------- settings and composition


def test_flexlora_refuses_the_coordinate_wise_aggregators():
    for aggregator in ("median", "trimmed-mean"):
        with pytest.raises(ValueError, match=f"flexlora does not support "
                                             f"aggregator={aggregator}: it sums"):
            make_strategy("flexlora", aggregator=aggregator)
        with pytest.raises(ValueError, match="flexlora does not support"):
            RunSettings.from_run_config({"strategy": "flexlora", "aggregator": aggregator})


def test_client_level_dp_composes_with_the_default_aggregator_only():
    common = {"lora_alpha": 8.0, "min_train_nodes": 4, "min_available_nodes": 4}
    for aggregator in ("median", "trimmed-mean", "norm-clip"):
        with pytest.raises(ValueError, match=f"aggregator={aggregator} does not compose with "
                                             "client-level DP"):
            FedIT(client_dp=ClientLevelDP(noise_multiplier=1.0), aggregator=aggregator,
                  **common)
        with pytest.raises(ValueError, match="does not compose with client-level DP"):
            RunSettings.from_run_config({"client-dp-noise": 1.0, "aggregator": aggregator})

    # the default works; DP's clip is the bound (the relative bound is not applied, so
    # a scaled update is clipped, not rejected), and it equals the run without the bound
    attack = lambda m: content(scaled_state(m, FAULTY, SCALED), COUNTS[FAULTY])  # noqa: E731
    results = []
    for bound in (10.0, 0.0):
        strategy = FedIT(client_dp=ClientLevelDP(noise_multiplier=0.5, clip_norm=0.5),
                         update_norm_bound=bound, **common)
        strategy, _, arrays, metrics = play_round("fedit", attack, strategy=strategy)
        assert strategy.history[1].rejections == [] and metrics["num-accepted"] == 4
        assert metrics["client-dp-clipped-fraction"] > 0
        results.append(arrays)
    assert_same_arrays(*results)


def test_settings_name_the_bad_value_and_pass_through_to_the_strategy():
    with pytest.raises(ValueError, match="update-norm-bound must be 0 .off. or a finite "
                                         "number >= 1.*got 0.5"):
        RunSettings.from_run_config({"update-norm-bound": 0.5})
    with pytest.raises(ValueError, match="aggregator must be one of"):
        RunSettings.from_run_config({"aggregator": "krum"})
    from server.run import build_strategy

    settings = RunSettings.from_run_config({
        "aggregator": "trimmed-mean", "trim-fraction": 0.25, "update-norm-bound": 4,
        "update-max-abs": 100.0, "clip-norm": 2.0})
    assert build_strategy(settings).robust == RobustConfig(
        aggregator="trimmed-mean", trim_fraction=0.25, clip_norm=2.0, update_norm_bound=4.0,
        update_max_abs=100.0)
    assert build_strategy(RunSettings.from_run_config({})).robust == RobustConfig()


# ------------------------------------------------------------- the direction screen


def shared_round(name: str, nodes=NODES, flipped: bool = False, **robust: object):
    strategy = make_strategy(name, **robust)
    messages = configure(strategy)
    replies = [Message(content(honest_state(messages[n], n, -1.0 if flipped and n == FAULTY
                                            else 1.0), COUNTS[n], 0.01 * n),
                       reply_to=messages[n]) for n in nodes]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, arrays, metrics


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_sign_flipped_update_is_rejected_by_the_direction_screen(name):
    """Its norm is an honest one's, so only its direction gives it away."""
    strategy, arrays, metrics = shared_round(name, flipped=True)
    _, honest, _ = shared_round(name, nodes=HONEST)
    stats = strategy.history[1]
    assert [node for node, _ in stats.rejections] == [FAULTY]
    assert "update direction: cosine" in stats.rejections[0][1]
    assert stats.details["update_cosines"][str(FAULTY)] < 0
    assert min(c for n, c in stats.details["update_cosines"].items()
               if n != str(FAULTY)) > 0.5
    assert_same_arrays(arrays, honest)
    # without the screen the flipped update is aggregated (the norm bound cannot see it)
    strategy, _, metrics = shared_round(name, flipped=True, update_min_cosine=-1.0)
    assert strategy.history[1].rejections == [] and metrics["num-accepted"] == 4
