from types import SimpleNamespace

from server.run import FederatedRun
from task.run_settings import RunSettings
from task.training import Encoded


def _run(**config):
    run = FederatedRun.__new__(FederatedRun)
    run.settings = RunSettings.from_run_config({"num-rounds": 3, **config})
    data = Encoded([[i] for i in range(100)], list(range(100)))
    run.runtime = SimpleNamespace(encoded_test=lambda: data)
    return run


def test_intermediate_rounds_use_a_fixed_subset_and_the_last_round_everything():
    run = _run(**{"eval-subset": 10})
    first, second = run._eval_data(1), run._eval_data(2)
    assert len(first) == 10 and first.input_ids == second.input_ids
    assert first.labels == [ids[0] for ids in first.input_ids]  # labels follow their inputs
    assert len(run._eval_data(3)) == 100


def test_no_subset_by_default():
    assert len(_run()._eval_data(1)) == 100


def test_eval_batch_size_auto_is_16_on_cpu_and_64_on_gpus_unless_set():
    import pytest
    import torch

    from task.run_settings import FederationSettings

    auto = FederationSettings()
    assert auto.eval_batch(torch.device("cpu")) == 16
    assert auto.eval_batch(torch.device("cuda", 0)) == 64
    assert FederationSettings(eval_batch_size=5).eval_batch(torch.device("cuda")) == 5
    with pytest.raises(ValueError, match="eval-batch-size must not be negative"):
        FederationSettings(eval_batch_size=-1)
