"""Fault injection at the aggregation: one faulty reply among honest ones, every strategy.

Each test configures a round for four nodes with a fake Grid, builds honest replies for
three of them and one faulty reply for the fourth, and aggregates. The faulty reply
must be rejected with a reason that names the problem, the round must complete, and
the new global adapter must be exactly (bit for bit) what the same strategy produces
from the honest replies alone. A zero update and a count at the cap are valid and are
aggregated as normal updates.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX
from strategies.base import LoraStrategy
from strategies.codec import adapter_to_record, record_to_adapter
from strategies.fedit import FedIT
from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA, FlexLoRAConfig
from strategies.hetlora import HetLoRA, HetLoRAConfig
from tests.conftest import random_adapter

pytestmark = pytest.mark.usefixtures("task_identity")

CAP = 1_000  # max-num-examples of every strategy here
NODES = (11, 12, 13, 14)
FAULTY = 13
HONEST = (11, 12, 14)
COUNTS = {11: 40, 12: 25, 13: 20, 14: 35}
# heterogeneous ranks, in sorted node order: the faulty node trains at 3, below r_max = 4
HETERO_RANKS = (4, 2, 3, 1)
HEAD = "base_model.model.classifier.weight"
EVIL = "base_model.model.evil.weight"
GLOBAL = random_adapter(np.random.default_rng(0), {"layer.0.query": 4, "layer.0.value": 4})
STRATEGIES = ("fedit", "ffa-lora", "hetlora", "flexlora")


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


def make_strategy(name: str, **robust: object) -> LoraStrategy:
    common = {"lora_alpha": 8.0, "min_train_nodes": len(NODES),
              "min_available_nodes": len(NODES), "max_num_examples": CAP, **robust}
    ranks = ",".join(map(str, HETERO_RANKS))
    if name == "fedit":
        return FedIT(**common)
    if name == "ffa-lora":
        return FFALoRA(**common)
    if name == "hetlora":
        return HetLoRA(config=HetLoRAConfig(client_ranks=ranks), **common)
    if name == "flexlora":
        return FlexLoRA(config=FlexLoRAConfig(client_ranks=ranks), **common)
    raise AssertionError(name)


def configure(strategy: LoraStrategy) -> dict[int, Message]:
    messages = strategy.configure_train(1, adapter_to_record(GLOBAL), ConfigRecord(), FakeGrid())
    return {m.metadata.dst_node_id: m for m in messages}


def honest_state(message: Message, node_id: int, sign: float = 1.0) -> dict[str, np.ndarray]:
    """What an honest node sends: the arrays it received, moved by a step the federation
    shares (as training on one task does) plus the node's own part.

    ``sign=-1``: that step reversed, a sign-flipping attacker with an honest norm. A
    lower-rank node's step is the leading block of the shared one.
    """
    shapes = GLOBAL.to_state_dict()
    own = np.random.default_rng(node_id)
    out = {}
    for key, array in sorted(message.content["arrays"].items()):
        value = array.numpy()
        shared = np.random.default_rng(zlib.crc32(key.encode())).standard_normal(
            shapes[key].shape)[tuple(slice(0, s) for s in value.shape)]
        step = 0.07 * shared + 0.07 * own.standard_normal(value.shape)
        out[key] = (value + sign * step).astype(np.float32)
    return out


def record(state: dict[str, np.ndarray | Array]) -> ArrayRecord:
    out = ArrayRecord()
    for key, value in state.items():
        out[key] = value if isinstance(value, Array) else Array(np.ascontiguousarray(value))
    return out


def content(state: dict[str, np.ndarray | Array], num_examples: object,
            train_loss: float = 0.5) -> RecordDict:
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": train_loss})
    return RecordDict({"arrays": record(state), "metrics": metrics})


def honest_replies(messages: dict[int, Message], nodes=HONEST) -> dict[int, Message]:
    return {n: Message(content(honest_state(messages[n], n), COUNTS[n], 0.01 * n),
                       reply_to=messages[n]) for n in nodes}


def key_of(state: dict[str, np.ndarray], suffix: str) -> str:
    return sorted(k for k in state if k.endswith(suffix))[0]


def module_of(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


def npy_bytes(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------- faults
#
# A fault turns an honest node's state (what it would send) into the faulty reply's
# content and says which reason it must be rejected with (a regular expression).


@dataclass(frozen=True)
class Fault:
    build: Callable[[dict[str, np.ndarray]], RecordDict]
    reason: Callable[[dict[str, np.ndarray]], str]


def _with(state: dict[str, np.ndarray], key: str, value: np.ndarray | Array) -> dict:
    return {**state, key: value}


def _poke(state: dict[str, np.ndarray], key: str, index: tuple[int, int], value: float) -> dict:
    poked = state[key].copy()
    poked[index] = value
    return _with(state, key, poked)


def _rank_plus_one(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every A one row longer, every B one column wider: a consistent rank r + 1."""
    grown = {}
    for key, value in state.items():
        if key.endswith(LORA_A_SUFFIX):
            value = np.vstack([value, np.ones((1, value.shape[1]), np.float32)])
        elif key.endswith(LORA_B_SUFFIX):
            value = np.hstack([value, np.ones((value.shape[0], 1), np.float32)])
        grown[key] = value
    return grown


def _rank_of(state: dict[str, np.ndarray]) -> int:
    return state[key_of(state, LORA_B_SUFFIX)].shape[1]


def _rank_above_reason(r: int) -> str:
    a = rf"A\.weight: shape \({r + 1}, 6\) does not fit the expected \({r}, 6\)"
    b = rf"B\.weight: shape \(5, {r + 1}\) does not fit the expected \(5, {r}\)"
    return rf"\.lora_({a}|{b})"


def _oversize(state: dict[str, np.ndarray]) -> dict:
    """The B factor's own .npy bytes followed by 4 MiB: right header, far too much data."""
    key = key_of(state, LORA_B_SUFFIX)
    value = state[key]
    data = npy_bytes(value) + bytes(4 * 2**20)
    return _with(state, key, Array(dtype="float32", shape=value.shape, stype="numpy.ndarray",
                                   data=data))


def _garbage(state: dict[str, np.ndarray]) -> dict:
    key = key_of(state, LORA_B_SUFFIX)
    value = state[key]
    size = len(npy_bytes(value))
    return _with(state, key, Array(dtype="float32", shape=value.shape, stype="numpy.ndarray",
                                   data=np.random.default_rng(1).bytes(size)))


FAULTS: dict[str, Fault] = {
    "nan": Fault(
        lambda s: content(_poke(s, key_of(s, LORA_B_SUFFIX), (0, 0), np.nan), COUNTS[FAULTY]),
        lambda s: re.escape(f"{key_of(s, LORA_B_SUFFIX)}: contains NaN or Inf")),
    "inf": Fault(
        lambda s: content(_poke(s, HEAD, (1, 2), np.inf), COUNTS[FAULTY]),
        lambda s: re.escape(f"{HEAD}: contains NaN or Inf")),
    "minus-inf": Fault(
        lambda s: content(_poke(s, key_of(s, LORA_B_SUFFIX), (-1, -1), -np.inf),
                          COUNTS[FAULTY]),
        lambda s: re.escape(f"{key_of(s, LORA_B_SUFFIX)}: contains NaN or Inf")),
    "wrong-shape-head": Fault(
        lambda s: content(_with(s, HEAD, np.zeros((3, 7), np.float32)), COUNTS[FAULTY]),
        lambda s: re.escape(f"{HEAD}: shape (3, 7) does not fit the expected (3, 6)")),
    "transposed-b": Fault(
        lambda s: content(_with(s, key_of(s, LORA_B_SUFFIX),
                                np.ascontiguousarray(s[key_of(s, LORA_B_SUFFIX)].T)),
                          COUNTS[FAULTY]),
        lambda s: re.escape(f"{key_of(s, LORA_B_SUFFIX)}: shape ({_rank_of(s)}, 5) does not "
                            f"fit the expected (5, {_rank_of(s)})")),
    # smaller than expected: fits the header check, caught when the factors are matched up
    "short-b": Fault(
        lambda s: content(_with(s, key_of(s, LORA_B_SUFFIX), s[key_of(s, LORA_B_SUFFIX)][:-1]),
                          COUNTS[FAULTY]),
        lambda s: (re.escape(f"{module_of(key_of(s, LORA_B_SUFFIX))}: ") + ".*"
                   + re.escape(f"B(4, {_rank_of(s)})") + " .*(inconsistent|does not match)")),
    "narrow-b": Fault(  # B one column short of A's rank
        lambda s: content(_with(s, key_of(s, LORA_B_SUFFIX),
                                np.ascontiguousarray(s[key_of(s, LORA_B_SUFFIX)][:, :-1])),
                          COUNTS[FAULTY]),
        lambda s: (re.escape(f"{module_of(key_of(s, LORA_B_SUFFIX))}: ") + ".*"
                   + re.escape(f"B(5, {_rank_of(s) - 1})") + " .*(inconsistent|does not match)")),
    "rank-above-max": Fault(
        lambda s: content(_rank_plus_one(s), COUNTS[FAULTY]),
        lambda s: _rank_above_reason(_rank_of(s))),
    "missing-key": Fault(
        lambda s: content({k: v for k, v in s.items() if k != key_of(s, LORA_B_SUFFIX)},
                          COUNTS[FAULTY]),
        lambda s: re.escape(f"missing ['{key_of(s, LORA_B_SUFFIX)}'], extra []")),
    "missing-head": Fault(
        lambda s: content({k: v for k, v in s.items() if k != HEAD}, COUNTS[FAULTY]),
        lambda s: re.escape(f"missing ['{HEAD}'], extra []")),
    "extra-key": Fault(
        lambda s: content(_with(s, EVIL, np.zeros(3, np.float32)), COUNTS[FAULTY]),
        lambda s: re.escape(f"missing [], extra ['{EVIL}']")),
    "float64": Fault(
        lambda s: content({k: v.astype(np.float64) for k, v in s.items()}, COUNTS[FAULTY]),
        lambda s: r": dtype float64 not accepted \(\['float32'\]\)"),
    "float16-head": Fault(
        lambda s: content(_with(s, HEAD, s[HEAD].astype(np.float16)), COUNTS[FAULTY]),
        lambda s: re.escape(f"{HEAD}: dtype float16 not accepted (['float32'])")),
    "int32-head": Fault(
        lambda s: content(_with(s, HEAD, s[HEAD].astype(np.int32)), COUNTS[FAULTY]),
        lambda s: re.escape(f"{HEAD}: dtype int32 not accepted (['float32'])")),
    "oversize": Fault(
        lambda s: content(_oversize(s), COUNTS[FAULTY]),
        lambda s: re.escape(f"{key_of(s, LORA_B_SUFFIX)}: payload of ")
        + r"\d{7} bytes exceeds \d{3}$"),
    "garbage-bytes": Fault(
        lambda s: content(_garbage(s), COUNTS[FAULTY]),
        lambda s: re.escape(f"{key_of(s, LORA_B_SUFFIX)}: undecodable array")),
    "no-metrics": Fault(
        lambda s: RecordDict({"arrays": record(s)}),
        lambda s: re.escape("missing MetricRecord 'metrics'")),
    "no-count": Fault(
        lambda s: RecordDict({"arrays": record(s),
                              "metrics": MetricRecord({"train-loss": 0.5})}),
        lambda s: re.escape("missing 'num-examples' in metrics")),
    "no-arrays": Fault(
        lambda s: RecordDict({"metrics": MetricRecord({"num-examples": COUNTS[FAULTY]})}),
        lambda s: re.escape("expected one ArrayRecord 'arrays', got []")),
    "two-array-records": Fault(
        lambda s: RecordDict({"arrays": record(s), "more": record(s),
                              "metrics": MetricRecord({"num-examples": COUNTS[FAULTY]})}),
        lambda s: re.escape("expected one ArrayRecord 'arrays', got ['arrays', 'more']")),
}

# Example counts: the rule is "a whole number in [1, max-num-examples]"; above the cap
# is rejected (not capped).
COUNT_REASONS: dict[str, tuple[object, str]] = {
    "count-zero": (0, "num-examples must be positive, got 0"),
    "count-negative": (-3, "num-examples must be positive, got -3"),
    "count-nan": (float("nan"), "num-examples must be a whole number, got nan"),
    "count-inf": (float("inf"), "num-examples must be a whole number, got inf"),
    "count-fraction": (2.5, "num-examples must be a whole number, got 2.5"),
    "count-1e12": (1e12, f"num-examples 1000000000000 exceeds the cap {CAP} (max-num-examples)"),
    "count-cap-plus-one": (CAP + 1, f"num-examples {CAP + 1} exceeds the cap {CAP} "
                                    "(max-num-examples)"),
}
for _name, (_value, _reason) in COUNT_REASONS.items():
    FAULTS[_name] = Fault(lambda s, v=_value: content(s, v),
                          lambda s, r=_reason: re.escape(r))


# --------------------------------------------------------------------------- helpers


def run_round(name: str, faulty: Callable[[dict[str, np.ndarray]], RecordDict] | None,
              **robust: object):
    """One round: honest replies (and the faulty one, in the middle); returns the results.

    ``robust``: robust-aggregation arguments of the strategy (``update_norm_bound``, ...).
    """
    strategy = make_strategy(name, **robust)
    messages = configure(strategy)
    replies = honest_replies(messages)
    ordered = [replies[11], replies[12]]
    if faulty is not None:
        bad = faulty(honest_state(messages[FAULTY], FAULTY))
        ordered.append(Message(bad, reply_to=messages[FAULTY]))
    ordered.append(replies[14])
    arrays, metrics = strategy.aggregate_train(1, ordered)
    return strategy, messages, arrays, metrics


def assert_same_arrays(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy(), err_msg=key)


# --------------------------------------------------------------------------- tests


def test_the_honest_round_itself_aggregates_and_moves_the_global_adapter():
    """Guard for the comparisons below: the honest-only round is a real aggregate."""
    for name in STRATEGIES:
        strategy, _, arrays, metrics = run_round(name, None)
        assert arrays is not None and metrics["num-accepted"] == 3, name
        changed = [k for k, v in adapter_to_record(GLOBAL).items()
                   if not np.array_equal(arrays[k].numpy(), v.numpy())]
        assert HEAD in changed, name


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_faulty_reply_is_rejected_and_the_aggregate_is_the_honest_one(name, fault):
    strategy, messages, arrays, metrics = run_round(name, FAULTS[fault].build)
    reference, _, expected_arrays, expected_metrics = run_round(name, None)

    stats = strategy.history[1]
    assert (stats.sampled, stats.accepted, stats.rejected, stats.failed) == (4, 3, 1, 0)
    [(node, reason)] = stats.rejections
    assert node == FAULTY
    pattern = FAULTS[fault].reason(honest_state(messages[FAULTY], FAULTY))
    assert re.search(pattern, reason), f"reason {reason!r} does not match {pattern!r}"

    assert arrays is not None and expected_arrays is not None  # the round completed
    assert_same_arrays(arrays, expected_arrays)
    assert reference.history[1].rejected == 0
    assert metrics["num-accepted"] == 3 and metrics["num-rejected"] == 1
    assert metrics["train-loss"] == expected_metrics["train-loss"]
    assert metrics["bytes-up"] == expected_metrics["bytes-up"]
    assert stats.client_ranks == reference.history[1].client_ranks
    assert FAULTY not in stats.client_ranks


def test_oversize_payload_is_rejected_before_anything_is_decoded(monkeypatch):
    key = key_of(honest_state(configure(make_strategy("fedit"))[FAULTY], FAULTY), LORA_B_SUFFIX)
    decoded: list[int] = []
    numpy = Array.numpy

    def spy(self: Array) -> np.ndarray:
        decoded.append(len(self.data))
        return numpy(self)

    monkeypatch.setattr(Array, "numpy", spy)
    strategy, messages, arrays, _ = run_round("fedit", FAULTS["oversize"].build)
    assert arrays is not None and "payload of" in strategy.history[1].rejections[0][1]
    assert decoded and max(decoded) < 2**20  # nothing of the 4 MiB reply was decoded
    # without the size check it would have decoded to a valid, finite factor
    oversized = _oversize(honest_state(messages[FAULTY], FAULTY))[key]
    np.testing.assert_array_equal(numpy(oversized),
                                  honest_state(messages[FAULTY], FAULTY)[key])


def test_rejections_reach_the_round_metrics_and_a_round_of_only_faults_keeps_the_global():
    strategy = make_strategy("fedit")
    messages = configure(strategy)
    bad = [Message(FAULTS[f].build(honest_state(messages[n], n)), reply_to=messages[n])
           for f, n in zip(("nan", "count-1e12", "oversize", "wrong-shape-head"), NODES,
                           strict=True)]
    arrays, metrics = strategy.aggregate_train(1, bad)
    assert arrays is None
    assert metrics["num-accepted"] == 0 and metrics["num-rejected"] == 4
    assert [n for n, _ in strategy.history[1].rejections] == list(NODES)


# ----------------------------------------------------------------- valid edge cases


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_zero_update_is_valid_and_aggregated_as_a_normal_update(name):
    """All-zero factors (and head) are a legitimate update: accepted, weighted as any other.

    FedIT/FFA-LoRA: it pulls the average toward zero by its share of the examples.
    FlexLoRA: the aggregated product and head shrink by that share. HetLoRA: its
    sparsity weight (the norm of its update) is zero, so the aggregate is the honest one.
    The norm bound and the direction screen are off here: resetting the random global
    adapter to zero is a change about 10x the honest ones', which the default bound
    rejects (tests/strategies/test_robust_aggregation.py).
    """
    zero = lambda s: content({k: np.zeros_like(v) for k, v in s.items()}, COUNTS[FAULTY])  # noqa: E731
    off = {"update_norm_bound": 0.0, "update_min_cosine": -1.0}
    strategy, messages, arrays, metrics = run_round(name, zero, **off)
    _, _, honest_arrays, _ = run_round(name, None, **off)
    stats = strategy.history[1]
    assert stats.rejections == [] and metrics["num-accepted"] == 4
    assert stats.client_ranks[FAULTY] == (3 if name in ("hetlora", "flexlora") else 4)

    got = record_to_adapter(arrays, 8.0)
    honest = record_to_adapter(honest_arrays, 8.0)
    n_honest = sum(COUNTS[n] for n in HONEST)
    share = n_honest / (n_honest + COUNTS[FAULTY])
    if name in ("fedit", "ffa-lora"):
        states = {n: honest_state(messages[n], n) for n in HONEST}
        expected = GLOBAL.to_state_dict()  # what is not sent stays the global's, bit for bit
        for key in states[11]:
            expected[key] = (sum(COUNTS[n] * states[n][key].astype(np.float64) for n in HONEST)
                             / (n_honest + COUNTS[FAULTY])).astype(np.float32)
        for key, value in got.to_state_dict().items():
            if key in states[11]:
                np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-7)
            else:
                np.testing.assert_array_equal(value, expected[key])
        assert not np.allclose(got.extras[HEAD], honest.extras[HEAD])  # the zero counted
    elif name == "flexlora":
        for module in GLOBAL.modules:
            np.testing.assert_allclose(got.modules[module].delta(8.0),
                                       share * honest.modules[module].delta(8.0),
                                       rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.extras[HEAD], share * honest.extras[HEAD], rtol=1e-5,
                                   atol=1e-7)
    else:
        assert stats.details["aggregation_weights"][str(FAULTY)] == 0.0
        for key, value in got.to_state_dict().items():
            np.testing.assert_allclose(value, honest.to_state_dict()[key], rtol=1e-6, atol=1e-7)


def test_a_count_at_the_cap_is_accepted_and_weighs_what_it_reports():
    def at_cap(state):
        return content(state, CAP)

    strategy, messages, arrays, metrics = run_round("fedit", at_cap)
    assert metrics["num-accepted"] == 4 and strategy.history[1].rejections == []
    states = {n: honest_state(messages[n], n) for n in NODES}
    counts = {**COUNTS, FAULTY: CAP}
    total = sum(counts.values())
    expected = (sum(counts[n] * states[n][HEAD].astype(np.float64) for n in NODES) / total)
    np.testing.assert_allclose(arrays[HEAD].numpy(), expected.astype(np.float32), rtol=1e-6)
