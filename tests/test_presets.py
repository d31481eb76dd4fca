"""Presets, the task-aware summary table and experiment figures, and failed-run detection."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.run import no_update_accepted
from simulations.cli import build_parser, score_columns, simulate_num_clients, simulate_run_config
from simulations.experiment import ExperimentSpec, Variant
from simulations.presets import PRESETS, SMOLLM2_BBC, get_preset
from task.run_settings import RunSettings
from tests.test_experiment import FakeSimulate, sweep


def _args(*argv: str):
    return build_parser().parse_args(["simulate", *argv])


def test_preset_settings_are_valid_and_overridable():
    for preset in PRESETS.values():
        RunSettings.from_run_config(preset.run_config)  # every preset parses
    config = simulate_run_config(_args("--preset", "smollm2-bbc", "--run-config",
                                       "num-rounds=2 local-steps=3", "--rank", "4"))
    assert config["model"] == "smollm2" and config["task"] == "instruction"
    assert config["num-rounds"] == "2" and config["local-steps"] == "3"  # --run-config wins
    assert config["lora-rank"] == 4  # explicit options win over both
    assert config["min-available-nodes"] == SMOLLM2_BBC.num_clients


def test_num_clients_comes_from_the_option_then_the_preset_then_four():
    assert simulate_num_clients(_args()) == 4
    assert simulate_num_clients(_args("--preset", "smollm2-bbc")) == SMOLLM2_BBC.num_clients
    assert simulate_num_clients(_args("--preset", "smollm2-bbc", "--num-clients", "3")) == 3


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="presets: smollm2-bbc"):
        get_preset("llama-70b")
    with pytest.raises(SystemExit):
        _args("--preset", "llama-70b")


def test_summary_columns_follow_the_task_scores():
    records = [{"round": 0, "eval_loss": 2.0, "eval_rouge_l": 0.1, "eval_exact_match": 0.0,
                "eval_topic_exact_match": 0.0, "eval_seconds": 3.0, "eval_accuracy": None}]
    assert score_columns(records) == ["eval_exact_match", "eval_rouge_l", "eval_loss",
                                      "eval_topic_exact_match"]


def test_experiment_score_is_the_tasks_metric():
    variants = [Variant("fedit", {"strategy": "fedit"})]
    assert ExperimentSpec("a", "d", variants).score_key == "eval_accuracy"
    assert ExperimentSpec("b", "d", variants,
                          base_config={"task": "instruction"}).score_key == "eval_rouge_l"
    assert ExperimentSpec("c", "d", variants,
                          base_config={"task": "causal-lm"}).score_key == "eval_perplexity"


def test_gains_table_gives_round_zero_last_round_and_the_per_seed_gain(tmp_path):
    from simulations.report import gains_table
    from tests.test_experiment import make_spec

    spec = make_spec(gain_keys=("eval_accuracy",))
    result = sweep(tmp_path, FakeSimulate(), spec=spec)
    table = gains_table(result).splitlines()
    # fedit: seeds 0 and 1 start at 0.40 and end at 0.80 and 0.86 (tests/test_experiment.py)
    fedit = next(line for line in table if line.startswith("| `fedit`"))
    assert fedit.split(" | ")[2:] == ["0.400 ± 0.000", "0.830 ± 0.042", "0.430 ± 0.042 |"]


def test_a_run_that_accepted_no_update_is_named_with_its_first_failure():
    def stats(accepted: int, failures=(), rejections=(), details=None):
        return SimpleNamespace(accepted=accepted, failed=len(failures),
                               rejected=len(rejections), failures=list(failures),
                               rejections=list(rejections), details=details or {})

    failing = {1: stats(0, failures=[(7, "Column (label) not in table")]),
               2: stats(0, rejections=[(8, "norm too large")])}
    message = no_update_accepted(failing, 1)
    assert message is not None
    assert "any of 2 round(s) (1 failed, 1 rejected)" in message
    assert "first: node 7: Column (label) not in table" in message
    assert no_update_accepted({**failing, 3: stats(1)}, 1) is None
    assert no_update_accepted({1: stats(1), 2: stats(0)}, 2) is not None  # resumed at 2
    assert no_update_accepted({}, 1) is None
    aborted = {1: stats(0, details={"secure_aggregation": {"aborted": "2 masked input(s)"}})}
    assert "secure aggregation aborted: 2 masked input(s)" in no_update_accepted(aborted, 1)


def test_the_run_stops_after_max_failed_rounds_in_a_row():
    from server.run import FederatedRun

    def stats(accepted, failures=()):
        return SimpleNamespace(accepted=accepted, sampled=2, failed=len(failures),
                               rejected=0, failures=list(failures), rejections=[],
                               details={})

    def run(history, limit=3):
        return SimpleNamespace(strategy=SimpleNamespace(history=history), settings=
                               SimpleNamespace(federation=SimpleNamespace(max_failed_rounds=limit)))

    mixed = [(1, "timeout"), (2, "KeyError")]
    history = {1: stats(0, mixed), 2: stats(0, mixed), 3: stats(1), 4: stats(0, mixed)}
    assert FederatedRun.reason_to_stop(run(history), 2) is None  # 2 empty rounds of 3
    assert FederatedRun.reason_to_stop(run(history), 4) is None  # round 3 trained
    history.update({5: stats(0, mixed), 6: stats(0, mixed)})
    reason = FederatedRun.reason_to_stop(run(history), 6)
    assert reason.startswith("the run stopped after round 6: 3 round(s) in a row")
    assert "first: node 1: timeout" in reason
    assert FederatedRun.reason_to_stop(run(history, limit=0), 6) is None  # 0 = never
    spent = stats(0, [(1, "refused to train: past epsilon-budget"), (2, "refused: budget")])
    spent.failure_codes = {1: 4001, 2: 4001}  # BUDGET_REFUSAL_CODE
    assert "every client refused to train past its privacy budget" in \
        FederatedRun.reason_to_stop(run({1: stats(1), 2: spent}), 2)
    same = {1: stats(0, [(1, "KeyError: 'topic'"), (2, "KeyError: 'topic'")])}
    assert "every client (2) failed with the same error: KeyError: 'topic'" in \
        FederatedRun.reason_to_stop(run(same), 1)
