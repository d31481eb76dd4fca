"""The audit of a run's global adapter: canaries reach clients, leakage is detected."""

import json

import numpy as np
import pytest

from server.state import ServerState, StateStore
from simulations.privacy_audit import audit_run, load_audit
from task.run_settings import RunSettings
from task.runtime import TaskRuntime, cached_runtime
from task.settings import TrainSettings
from task.training import per_example_losses, train_local
from tests.conftest import tiny_run_config

CANARIES = 60


def config(tiny_bert_dir, toy_csv, tmp_path, **extra):
    return tiny_run_config(tiny_bert_dir, toy_csv, **{
        "results-dir": str(tmp_path), "audit-canaries": CANARIES, "max-length": 32, **extra})


def test_included_canaries_go_to_the_client_they_are_dealt_to(tiny_bert_dir, toy_csv, tmp_path):
    with_canaries = TaskRuntime.build(RunSettings.from_run_config(
        config(tiny_bert_dir, toy_csv, tmp_path)).task)
    plain = TaskRuntime.build(RunSettings.from_run_config(
        config(tiny_bert_dir, toy_csv, tmp_path, **{"audit-canaries": 0})).task)
    canaries, included = with_canaries.audit_canaries()
    assert len(canaries) == CANARIES and 0 < included.sum() < CANARIES
    texts = {t: i for i, t in enumerate(canaries.texts)}
    for pid in range(3):
        extra = len(with_canaries.encoded_partition(pid, 3)) - len(plain.encoded_partition(pid, 3))
        expected = [i for i in range(CANARIES) if included[i] and i % 3 == pid]
        assert extra == len(expected)
    # the server rebuilds exactly the same canaries and coins from the settings
    again = TaskRuntime.build(RunSettings.from_run_config(
        config(tiny_bert_dir, toy_csv, tmp_path)).task)
    same, same_mask = again.audit_canaries()
    assert same.texts == canaries.texts and (same_mask == included).all()
    assert set(texts) == set(same.texts)


def save_run(run_dir, runtime, client_epsilon):
    StateStore(run_dir).save(ServerState(round=1, arrays=runtime.get_adapter().to_state_dict()))
    (run_dir / "details.json").write_text(json.dumps(
        {"1": {"client_epsilon": client_epsilon}}))


def test_the_audit_flags_an_adapter_that_memorised_its_canaries(tiny_bert_dir, toy_csv,
                                                                tmp_path):
    run_config = config(tiny_bert_dir, toy_csv, tmp_path, **{"lora-rank": 8, "lora-alpha": 32.0})
    settings = RunSettings.from_run_config(run_config)
    runtime = cached_runtime(settings.task)
    runtime.activate()
    runtime.set_adapter(runtime.initial_adapter)

    save_run(tmp_path, runtime, {"11": 0.5, "12": 0.75})
    untrained = audit_run(tmp_path, run_config)
    assert untrained["client_epsilon"] == {"11": 0.5, "12": 0.75}
    assert untrained["canaries"]["one_run"]["epsilon_lower_bound"] == 0.0
    assert 0.25 < untrained["canaries"]["attack"]["auc"] < 0.75

    # memorise the included canaries (what a non-DP run that overfits does)
    canaries, included = runtime.audit_canaries()
    from task.canaries import canary_dataset

    members = runtime.encode(canary_dataset(canaries.subset(included), like=runtime.data.train))
    train_local(runtime.model, runtime.tokenizer, members,
                TrainSettings(learning_rate=0.005, local_steps=300, batch_size=16),
                device=runtime.device, seed=0)
    save_run(tmp_path, runtime, {})
    leaked = audit_run(tmp_path, run_config)
    assert leaked["canaries"]["attack"]["auc"] > 0.9
    assert leaked["canaries"]["one_run"]["epsilon_lower_bound"] > 0.5
    assert leaked["canaries"]["attack"]["num_members"] == int(included.sum())
    assert load_audit(tmp_path) == leaked

    # the attack scores are the per-example losses under the saved adapter
    losses = per_example_losses(runtime.model, runtime.tokenizer, members, batch_size=7,
                                device=runtime.device)
    assert losses.shape == (int(included.sum()),) and np.isfinite(losses).all()
    assert float(np.mean(losses)) < 0.5


def test_audit_needs_a_saved_adapter(tiny_bert_dir, toy_csv, tmp_path):
    with pytest.raises(ValueError, match="no saved global adapter"):
        audit_run(tmp_path, config(tiny_bert_dir, toy_csv, tmp_path))
