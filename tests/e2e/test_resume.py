"""A server stopped after round 1 and resumed ends where an uninterrupted run ends."""

import json

import pytest
from safetensors.numpy import load_file

from server.run import FederatedRun
from simulations.simulate import simulate
from tests.conftest import tiny_run_config
from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


class SimulatedCrash(RuntimeError):
    pass


def final_adapter(results) -> dict:
    return load_file(str(results / "final_adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("strategy", ["ffa-lora"])
def test_resumed_run_ends_with_the_uninterrupted_runs_adapter(
        tmp_path, tiny_bert_dir, toy_csv, monkeypatch, strategy):
    def config(name, **extra):
        return tiny_run_config(tiny_bert_dir, toy_csv, **{
            "num-rounds": 3, "strategy": strategy, "results-dir": str(tmp_path / name),
            "local-steps": 4, "lora-alpha": 32.0, **extra})

    straight = simulate(config("straight"), num_clients=2, gpus_per_client=0.0)

    save_state = FederatedRun.save_state

    def crash_after_round_one(self, server_round, arrays):
        save_state(self, server_round, arrays)
        if server_round == 1:
            raise SimulatedCrash("the server dies after saving round 1")

    monkeypatch.setattr(FederatedRun, "save_state", crash_after_round_one)
    # the ServerApp's exception ends the simulation (Flower re-raises it here)
    with pytest.raises(SimulatedCrash):
        simulate(config("interrupted"), num_clients=2, gpus_per_client=0.0)
    monkeypatch.setattr(FederatedRun, "save_state", save_state)
    interrupted = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())
    assert [r["round"] for r in interrupted] == [0, 1]

    resumed = simulate(config("interrupted", resume=True), num_clients=2, gpus_per_client=0.0)

    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    # rounds before the restart are the saved ones; the rounds after match the straight run
    assert resumed[1]["eval_loss"] == straight[1]["eval_loss"]
    for mine, theirs in zip(resumed[2:], straight[2:], strict=True):
        assert mine["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-6)
    summary = json.loads((tmp_path / "interrupted" / "summary.json").read_text())
    assert summary["resumed_after_round"] == 1
    expected, got = final_adapter(tmp_path / "straight"), final_adapter(tmp_path / "interrupted")
    assert expected.keys() == got.keys()
    for key in expected:
        assert (got[key] == expected[key]).all() or abs(got[key] - expected[key]).max() < 1e-6, key


def test_resume_with_other_training_settings_is_refused(tmp_path, tiny_bert_dir, toy_csv):
    from server.state import ServerState, StateStore
    from task.run_settings import RunSettings

    config = tiny_run_config(tiny_bert_dir, toy_csv, **{"results-dir": str(tmp_path),
                                                        "resume": True, "lora-rank": 2})
    StateStore(tmp_path).save(ServerState(round=1, arrays={}, settings={"lora-rank": 4}))
    run = FederatedRun(RunSettings.from_run_config(config))
    with pytest.raises(ValueError, match=r"lora-rank \(4, now 2\)"):
        run.resume()
