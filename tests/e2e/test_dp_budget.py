"""DP-SGD through a real simulation: epsilon accumulates, and a spent budget is refused."""

import json

import pytest

from privacy.accounting import PrivacyLedger
from simulations.simulate import simulate
from task.dp_training import dp_sample_rate
from task.settings import TrainSettings
from tests.conftest import tiny_run_config
from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def test_clients_refuse_the_round_past_their_budget_and_the_run_ends_there(
        tmp_path, tiny_bert_dir, toy_csv, node_state_dir):
    # 240 toy rows, 20% held out, IID over 2 clients: 96 training examples each
    steps, noise, delta = 3, 1.0, 1e-3
    rate = dp_sample_rate(96, TrainSettings(batch_size=8, local_steps=steps))
    ledger = PrivacyLedger("rdp")
    ledger.record(noise_multiplier=noise, sample_rate=rate, steps=steps)
    after_one = ledger.epsilon(delta)
    after_two = ledger.epsilon_after(noise_multiplier=noise, sample_rate=rate, steps=steps,
                                     delta=delta)
    budget = (after_one + after_two) / 2  # round 1 fits, round 2 would not
    results = tmp_path / "run"
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "num-rounds": 3, "local-steps": steps, "results-dir": str(results), "dp": True,
        "dp-noise-multiplier": noise, "dp-delta": delta, "dp-epsilon-budget": budget})
    records = simulate(config, num_clients=2, gpus_per_client=0.0)

    # round 2: both clients refuse (their budgets are spent); there is nothing left to
    # train, so the run ends there, as a finished run (round 1 trained), not a failure
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[1]["num_accepted"] == 2 and records[1]["num_failed"] == 0
    assert records[1]["dp_epsilon_max"] == pytest.approx(after_one, rel=1e-6)
    assert (records[2]["num_accepted"], records[2]["num_failed"]) == (0, 2)
    details = json.loads((results / "details.json").read_text())
    epsilons = details["1"]["client_epsilon"]
    assert len(epsilons) == 2 and max(epsilons.values()) <= budget
    summary = json.loads((results / "summary.json").read_text())
    assert "every client refused to train past its privacy budget" in summary["stopped"]
    assert summary["failure"] is None
    assert summary["final"]["eval_accuracy"] == records[1]["eval_accuracy"]  # unchanged
    assert summary["dp_private_against_server"] is True  # noise from OS entropy
    # simulated nodes keep their ledger for the run only: research runs do not accumulate
    assert not (node_state_dir / "dp-ledgers").exists()


def test_a_reproducible_dp_run_is_flagged_as_not_private_against_the_server(
        tmp_path, tiny_bert_dir, toy_csv):
    results = tmp_path / "run"
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "num-rounds": 1, "results-dir": str(results), "dp": True, "dp-delta": 1e-3,
        "dp-reproducible": True})
    records = simulate(config, num_clients=2, gpus_per_client=0.0)
    assert records[1]["num_accepted"] == 2  # simulated nodes allow dp-reproducible
    summary = json.loads((results / "summary.json").read_text())
    assert summary["dp_private_against_server"] is False
    assert json.loads((results / "config.json").read_text())["dp-reproducible"] is True
