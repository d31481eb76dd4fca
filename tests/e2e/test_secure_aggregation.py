"""Secure aggregation end to end in Flower's simulation engine: same adapter as a plain run.

Each supported strategy runs one round twice, plain and with ``secure-aggregation=true``;
the clients train identically (seeded), so the two final adapters differ only by the
fixed-point encoding: at most ``c / (2 (2^(b-1) - 1))`` per value.
"""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from privacy.secagg_config import SecureAggregationConfig
from simulations.simulate import simulate
from tests.conftest import tiny_run_config
from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

ROUNDING = SecureAggregationConfig().rounding_error()
STRATEGIES = {
    "fedit": {},
    "ffa-lora": {},
    "fedsa-lora": {},
    # one rank for all: which partition gets which explicit rank follows the simulation's
    # random node ids (the fake-grid test in tests/privacy covers mixed ranks)
    "hetlora": {"client-ranks": "2,2,2", "hetlora-weighting": "data-size"},
}


def _run(tmp_path, tiny_bert_dir, toy_csv, name, secure, rounds=1, **extra):
    results = tmp_path / f"{name}-{'secure' if secure else 'plain'}"
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "num-rounds": rounds, "results-dir": str(results), "local-steps": 5,
        "secure-aggregation": secure, **extra})
    records = simulate(config, num_clients=3, gpus_per_client=0.0)
    adapter = load_file(str(results / "final_adapter" / "adapter_model.safetensors"))
    details = json.loads((results / "details.json").read_text())
    return records, adapter, details


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_secure_round_matches_the_plain_round(tmp_path, tiny_bert_dir, toy_csv, strategy):
    extra = {"strategy": strategy, **STRATEGIES[strategy]}
    plain, plain_adapter, _ = _run(tmp_path, tiny_bert_dir, toy_csv, strategy, False, **extra)
    secure, secure_adapter, details = _run(tmp_path, tiny_bert_dir, toy_csv, strategy, True,
                                           **extra)
    difference = _max_difference(plain_adapter, secure_adapter)
    assert 0 < difference <= ROUNDING * 1.01 + 1e-7  # quantized, and by no more than that
    assert secure[1]["num_accepted"] == 3 and secure[1]["secagg_unmask_clients"] == 3
    assert "agg_error_mean" not in secure[1]  # it would need each client's factors
    assert secure[1]["train_loss"] == pytest.approx(plain[1]["train_loss"], abs=2e-3)
    telemetry = details["1"]["secure_aggregation"]
    assert set(telemetry["stages"]) == {"setup", "share-keys", "masked-input", "unmask"}
    assert telemetry["recovered"] == {"self-masks": 3, "dropped-keys": 0}
    if strategy == "hetlora":  # each client's rank is reported in clear; factors zero-padded
        assert sorted(details["1"]["client_ranks"].values()) == [2, 2, 2]


def test_slora_both_stages_match(tmp_path, tiny_bert_dir, toy_csv):
    extra = {"strategy": "slora", "slora-rounds": 1, "slora-density": 0.1}
    _, plain, _ = _run(tmp_path, tiny_bert_dir, toy_csv, "slora", False, rounds=2, **extra)
    records, secure, _ = _run(tmp_path, tiny_bert_dir, toy_csv, "slora", True, rounds=2,
                              **extra)
    assert [r.get("stage") for r in records] == [None, 1.0, 2.0]
    assert "agg_error_mean" not in records[2]  # stage 2's FedIT cannot see the factors
    # two rounds: round 2 starts from a global that already differs by the encoding
    assert _max_difference(plain, secure) < 20 * ROUNDING


def test_composes_with_encryption_and_client_level_dp(tmp_path, tiny_bert_dir, toy_csv):
    """Sealed masked vectors; each client clips its own change; the server adds the noise."""
    records, _, details = _run(
        tmp_path, tiny_bert_dir, toy_csv, "fedit-dp", True, rounds=1, **{
            "encrypt-payloads": True, "client-dp-noise": 0.5, "client-dp-clip": 0.05,
            "client-dp-secure-seed": False})
    assert records[1]["num_accepted"] == 3
    assert records[1]["client_dp_epsilon"] > 0 and records[1]["client_dp_noise_std"] > 0
    summary = json.loads((tmp_path / "fedit-dp-secure" / "summary.json").read_text())
    assert summary["secure_aggregation"] and summary["transport"] == "encrypted"
    assert details["1"]["secure_aggregation"]["recovered"]["self-masks"] == 3


def test_composes_with_dp_sgd(tmp_path, tiny_bert_dir, toy_csv):
    records, _, _ = _run(tmp_path, tiny_bert_dir, toy_csv, "dpsgd", True, rounds=1,
                         **{"dp": True, "dp-noise-multiplier": 0.5, "batch-size": 8})
    assert records[1]["num_accepted"] == 3
    assert "dp_epsilon_max" not in records[1]  # a client's epsilon depends on its data size
