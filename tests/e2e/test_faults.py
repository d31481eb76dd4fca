"""Fault injection through Flower's simulation engine: faulty clients among honest ones.

Four clients, two rounds of FedIT; partitions 1 and 3 misbehave (a NaN and a wrong shape
in round 1, an oversize payload and 1e12 examples in round 2). Their updates must be
rejected with their reasons in ``details.json``, every round must complete with the two
honest clients, and the final global adapter must be the one of a reference run in which
the same two partitions send no update at all (an error reply): same seed, same honest
clients, same sampling.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from simulations.simulate import _shutdown_ray, backend_config
from task.run_settings import RunSettings
from tests.conftest import tiny_run_config
from tests.e2e.faulty_client import make_faulty_client_app
from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

NUM_CLIENTS = 4
FAULTY = {1: ("nan", "oversize"), 3: ("wrong-shape", "huge-count")}
ABSENT = {1: ("fail", "fail"), 3: ("fail", "fail")}
REASONS = {  # what each round's two rejections must say
    1: ("contains NaN or Inf", "does not fit the expected"),
    2: ("bytes exceeds", "num-examples 1000000000000 exceeds the cap"),
}


def _simulate(config: dict[str, Any], faults: Mapping[int, Sequence[str]]) -> list[dict]:
    """``simulations.simulate.simulate`` with the faulty ClientApp in place of the real one."""
    from flwr.simulation import run_simulation

    from server.app import make_server_app

    run_config = {"encrypt-payloads": False, **config}
    overrides = RunSettings.from_run_config(run_config).to_dict()
    try:
        run_simulation(
            server_app=make_server_app(overrides),
            client_app=make_faulty_client_app(overrides, faults),
            num_supernodes=NUM_CLIENTS,
            backend_config=backend_config(1.0, 0.0),  # type: ignore[arg-type]
        )
    finally:
        _shutdown_ray()
    return json.loads((Path(config["results-dir"]) / "metrics.json").read_text())


def _adapter(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_faulty_clients_are_rejected_and_the_result_is_the_honest_one(
    tiny_bert_dir, toy_csv, tmp_path
):
    runs = {}
    for name, faults in (("faulty", FAULTY), ("absent", ABSENT)):
        config = tiny_run_config(tiny_bert_dir, toy_csv, **{
            "num-rounds": 2, "results-dir": str(tmp_path / name),
            "min-train-nodes": NUM_CLIENTS, "max-num-examples": 10_000, "keep-checkpoints": 2})
        runs[name] = _simulate(config, faults)

    faulty, absent = runs["faulty"], runs["absent"]
    assert [r["round"] for r in faulty] == [r["round"] for r in absent] == [0, 1, 2]
    for f, a in zip(faulty[1:], absent[1:], strict=True):
        assert (f["num_sampled"], f["num_accepted"], f["num_rejected"], f["num_failed"]) == \
            (4, 2, 2, 0)
        assert (a["num_sampled"], a["num_accepted"], a["num_rejected"], a["num_failed"]) == \
            (4, 2, 0, 2)
        assert f["bytes_up"] == a["bytes_up"]  # only the honest replies count as received
        assert f["train_loss"] == a["train_loss"] and f["eval_loss"] == a["eval_loss"]

    details = json.loads((tmp_path / "faulty" / "details.json").read_text())
    rejected_nodes = []
    for server_round, expected in REASONS.items():
        rejections = details[str(server_round)]["rejections"]
        reasons = sorted(r["reason"] for r in rejections)
        assert len(reasons) == 2
        for needle in expected:
            assert sum(needle in reason for reason in reasons) == 1, (needle, reasons)
        rejected_nodes.append({r["node"] for r in rejections})
        assert not set(details[str(server_round)]["client_ranks"]) & \
            {str(n) for n in rejected_nodes[-1]}
    assert rejected_nodes[0] == rejected_nodes[1]  # the same two nodes, both rounds
    absent_details = json.loads((tmp_path / "absent" / "details.json").read_text())
    assert all("rejections" not in absent_details[str(r)] for r in (1, 2))

    # the global adapter after each round: the honest clients' aggregate, as if the
    # faulty ones had sent nothing, bit for bit (clients are deterministic given their
    # partition and the seed, and a sum of two honest terms does not depend on the
    # order the replies arrive in)
    for sub in ("checkpoints/round-001", "checkpoints/round-002", "final_adapter"):
        got, expected = _adapter(tmp_path / "faulty" / sub), _adapter(tmp_path / "absent" / sub)
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{sub}: {key}")
    first = _adapter(tmp_path / "absent" / "checkpoints/round-001")
    final = _adapter(tmp_path / "absent" / "final_adapter")
    assert any(not np.array_equal(first[k], final[k]) for k in final)  # round 2 moved it


def test_every_client_failing_the_same_way_stops_the_run_at_once(tmp_path, tiny_bert_dir,
                                                                 toy_csv):
    """A broken setup fails every client identically: stop after that round, say why, once."""
    from server.errors import RunFailed

    results = tmp_path / "crash"
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "num-rounds": 3, "results-dir": str(results), "local-steps": 2})
    crash = {p: ("crash",) * 3 for p in range(NUM_CLIENTS)}
    with pytest.raises(RunFailed, match="every client \\(4\\) failed with the same error: "
                       "KeyError: 'topic'"):
        _simulate(config, crash)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["stopped"].startswith("the run stopped after round 1")
    assert summary["failure"] == summary["stopped"]
    records = json.loads((results / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1]  # rounds 2 and 3 never ran
