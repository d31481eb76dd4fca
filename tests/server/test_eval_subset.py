from types import SimpleNamespace

from server.run import FederatedRun
from server.settings import RunSettings
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
