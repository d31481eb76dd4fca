"""Simulated attackers (simulations/attacks.py): their arithmetic, parsing and label flip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from simulations.attacks import Attack, flipped_labels, tamper
from task.run_settings import RunSettings
from task.runtime import cached_runtime
from tests.conftest import tiny_run_config

SENT = {"a": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "h": np.zeros(2, np.float32)}
# the first row of "a" (a node at a lower rank) moved by (1, 1), "h" by (3, 4)
TRAINED = {"a": np.array([[2.0, 3.0]], np.float32), "h": np.array([3.0, 4.0], np.float32)}
RNG = np.random.default_rng(0)


def test_scaled_and_sign_flip_change_the_change_only():
    scaled = tamper(TRAINED, SENT, Attack("scaled", frozenset({0})), RNG)
    np.testing.assert_array_equal(scaled["a"], [[101.0, 102.0]])
    np.testing.assert_array_equal(scaled["h"], [300.0, 400.0])
    flipped = tamper(TRAINED, SENT, Attack("sign-flip", frozenset({0})), RNG)
    np.testing.assert_array_equal(flipped["a"], [[0.0, 1.0]])
    np.testing.assert_array_equal(flipped["h"], [-3.0, -4.0])
    assert flipped["a"].dtype == np.float32
    custom = tamper(TRAINED, SENT, Attack("scaled", frozenset({0}), scale=2.0), RNG)
    np.testing.assert_array_equal(custom["h"], [6.0, 8.0])


def test_noise_keeps_the_norm_of_the_change():
    noisy = tamper(TRAINED, SENT, Attack("noise", frozenset({0})), RNG)
    change = np.concatenate([(noisy["a"] - SENT["a"][:1]).ravel(), noisy["h"].ravel()])
    assert np.linalg.norm(change) == pytest.approx(math.sqrt(1 + 1 + 9 + 16), rel=1e-5)
    assert not np.allclose(noisy["h"], TRAINED["h"])


def test_attack_keys_are_parsed_and_removed():
    attack, rest = Attack.from_run_config({"attack": "sign-flip", "attack-clients": "0, 3",
                                           "attack-scale": 2, "seed": 5, "num-rounds": 3})
    assert attack == Attack("sign-flip", frozenset({0, 3}), 2.0, 5)
    assert rest == {"seed": 5, "num-rounds": 3}
    assert attack.attacks(3) and not attack.attacks(1)
    assert not Attack("none", frozenset({0})).attacks(0)
    assert Attack("scaled").multiplier == 100.0 and Attack("noise").multiplier == 1.0
    with pytest.raises(ValueError, match="attack must be one of"):
        Attack.from_run_config({"attack": "backdoor"})
    with pytest.raises(ValueError, match="attack-clients must be comma-separated"):
        Attack.from_run_config({"attack": "scaled", "attack-clients": "a"})
    with pytest.raises(ValueError, match="attack-scale must be a finite number >= 0"):
        Attack("scaled", scale=-1.0)


def test_label_flip_shifts_the_partition_labels_while_open(tiny_bert_dir, toy_csv, tmp_path):
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{"results-dir": str(tmp_path)})
    overrides = RunSettings.from_run_config(config).to_dict()
    runtime = cached_runtime(RunSettings.from_run_config(config).task)
    honest = runtime.encoded_partition(1, 3)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with flipped_labels(context, overrides):
        flipped = runtime.encoded_partition(1, 3)
    assert flipped.input_ids == honest.input_ids
    classes = runtime.data.num_labels
    assert flipped.labels == [(y + 1) % classes for y in honest.labels]
    assert runtime.encoded_partition(1, 3).labels == honest.labels  # restored
