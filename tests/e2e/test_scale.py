"""A federation of 100 simulated clients, 10% sampled per round, on this machine."""

import csv
import json

import pytest

from simulations.simulate import simulate
from tests.conftest import make_texts, tiny_run_config
from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]


def test_hundred_clients_with_ten_percent_sampled(tmp_path, tiny_bert_dir):
    data = tmp_path / "toy-2000.csv"
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["body", "topic", "source"])
        writer.writerows(make_texts(2000))
    results = tmp_path / "run"
    # the direction screen off: two local steps of a tiny random model on toy data are too
    # weakly aligned for it (over runs it rejected an honest update at 0.49 x the round's
    # median cosine, and one at cosine -0.19; docs/privacy.md, "Malicious updates"), and which 10
    # of the 100 partitions a round samples changes from run to run (random node ids).
    # This test is about scale.
    config = tiny_run_config(tiny_bert_dir, data, **{
        "num-rounds": 2, "fraction-train": 0.1, "min-train-nodes": 2, "local-steps": 2,
        "results-dir": str(results), "eval-subset": 60, "update-min-cosine": -1.0})
    records = simulate(config, num_clients=100, gpus_per_client=0.0)

    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert (r["num_sampled"], r["num_accepted"], r["num_rejected"]) == (10, 10, 0)
    details = json.loads((results / "details.json").read_text())
    sampled = [set(details[str(rnd)]["client_ranks"]) for rnd in (1, 2)]
    assert all(len(s) == 10 for s in sampled) and sampled[0] != sampled[1]
