"""An attacker through Flower's simulation engine: rejected, and the result is the honest one.

Four clients, two rounds of FedIT on the tiny model; partition 1 sends its change x100
(simulations/attacks.py) in every round. The default norm bound must reject it with its
reason in ``details.json``, and the global adapter after every round must be bit for bit
the one of a run in which partition 1 sends nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from simulations.attacks import simulate_attacked
from tests.conftest import tiny_run_config
from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def _adapter(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_a_scaled_attacker_is_rejected_and_the_result_is_the_honest_one(
        tiny_bert_dir, toy_csv, tmp_path):
    runs = {}
    for attack in ("scaled", "silent"):
        config = tiny_run_config(tiny_bert_dir, toy_csv, **{
            "num-rounds": 2, "results-dir": str(tmp_path / attack), "min-train-nodes": 4,
            "keep-checkpoints": 2, "attack": attack, "attack-clients": "1"})
        runs[attack] = simulate_attacked(config, num_clients=4, gpus_per_client=0.0)
    for scaled, silent in zip(runs["scaled"][1:], runs["silent"][1:], strict=True):
        assert (scaled["num_accepted"], scaled["num_rejected"], scaled["num_failed"]) == (3, 1, 0)
        assert (silent["num_accepted"], silent["num_rejected"], silent["num_failed"]) == (3, 0, 1)
        assert scaled["bytes_up"] == silent["bytes_up"]
        assert scaled["eval_loss"] == silent["eval_loss"]
    details = json.loads((tmp_path / "scaled" / "details.json").read_text())
    for server_round in ("1", "2"):
        (rejection,) = details[server_round]["rejections"]
        assert "exceeds update-norm-bound 10 x the round's median update norm" in \
            rejection["reason"]
        norms = details[server_round]["update_norms"]
        assert norms[str(rejection["node"])] > 50 * min(norms.values())
    for sub in ("checkpoints/round-001", "checkpoints/round-002", "final_adapter"):
        got, expected = _adapter(tmp_path / "scaled" / sub), _adapter(tmp_path / "silent" / sub)
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{sub}: {key}")
