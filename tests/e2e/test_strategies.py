"""Every strategy end to end through Flower's simulation engine (tiny model, 2 rounds)."""

import json

import numpy as np
import pytest
from flwr.app import Array

from simulations.simulate import simulate
from strategies.parts import LORA_B, part_of
from tests.conftest import tiny_run_config
from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

SEEN_KEYS: list[str] = []


def _run(tmp_path, tiny_bert_dir, toy_csv, strategy, **extra):
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "num-rounds": 2, "results-dir": str(tmp_path / strategy), "local-steps": 5,
        "strategy": strategy, **extra})
    records = simulate(config, num_clients=3, gpus_per_client=0.0)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_accepted"] == 3 and r["num_rejected"] == 0 for r in records[1:])
    details = json.loads((tmp_path / strategy / "details.json").read_text())
    return records, details


def test_ffa_lora_uploads_half_of_fedit_and_is_exact(tmp_path, tiny_bert_dir, toy_csv):
    ffa, details = _run(tmp_path, tiny_bert_dir, toy_csv, "ffa-lora")
    fedit, _ = _run(tmp_path, tiny_bert_dir, toy_csv, "fedit")
    # measured from the messages: B plus the head, against A, B plus the head; the head
    # (trained in full by both) is the same in both, so take out its encoded size
    head = [Array(np.zeros((3, 32), np.float32)), Array(np.zeros(3, np.float32))]
    head_bytes = 3 * sum(len(a.data) for a in head)  # 3 clients
    ratio = (ffa[1]["bytes_up"] - head_bytes) / (fedit[1]["bytes_up"] - head_bytes)
    assert ratio == 0.5
    assert max(details["1"]["aggregation_error"].values()) < 1e-5  # avg(B) A = avg(B A)
    assert fedit[1]["agg_error_mean"] > 1e-3


def test_fedsa_never_sends_b(tmp_path, tiny_bert_dir, toy_csv, monkeypatch):
    """Every key of every reply that reaches the server (the ServerApp runs in this process)."""
    import strategies.base

    collect = strategies.base.collect_updates

    def inspected(replies, *args):
        replies = list(replies)
        for message in replies:
            if message.has_content():
                for record in message.content.array_records.values():
                    SEEN_KEYS.extend(record.keys())
        return collect(replies, *args)

    monkeypatch.setattr(strategies.base, "collect_updates", inspected)
    SEEN_KEYS.clear()
    _run(tmp_path, tiny_bert_dir, toy_csv, "fedsa-lora")
    assert SEEN_KEYS and not [k for k in SEEN_KEYS if part_of(k) == LORA_B]


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_heterogeneous_ranks(tmp_path, tiny_bert_dir, toy_csv, strategy):
    records, details = _run(tmp_path, tiny_bert_dir, toy_csv, strategy,
                            **{"client-ranks": "1,2,4"})
    assert sorted(details["1"]["client_ranks"].values()) == [1, 2, 4]
    assert records[2]["eval_loss"] < records[0]["eval_loss"]


@pytest.mark.parametrize("then", ["fedit", "ffa-lora"])
def test_slora_runs_both_stages_in_one_run(tmp_path, tiny_bert_dir, toy_csv, then):
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "num-rounds": 3, "results-dir": str(tmp_path / then), "local-steps": 5,
        "strategy": "slora", "slora-rounds": 2, "slora-density": 0.1, "slora-then": then})
    records = simulate(config, num_clients=2, gpus_per_client=0.0)
    assert [r.get("stage") for r in records] == [None, 1.0, 1.0, 2.0]
    assert all(r["num_accepted"] == 2 and r["num_rejected"] == 0 for r in records[1:])
    assert records[1]["bytes_up"] < records[3]["bytes_up"]  # stage 1 sends 10% of q/v
    assert records[3]["eval_loss"] < records[0]["eval_loss"]


def test_encryption_on_gives_the_same_global_adapter_as_off(tmp_path, tiny_bert_dir, toy_csv):
    from safetensors.numpy import load_file

    finals = {}
    for encrypt in (True, False):
        folder = tmp_path / f"encrypt-{encrypt}"
        config = tiny_run_config(tiny_bert_dir, toy_csv, **{
            "num-rounds": 2, "results-dir": str(folder), "local-steps": 3,
            "encrypt-payloads": encrypt})
        records = simulate(config, num_clients=2, gpus_per_client=0.0)
        assert all(r["num_accepted"] == 2 for r in records[1:])
        finals[encrypt] = load_file(str(folder / "final_adapter" / "adapter_model.safetensors"))
        summary = json.loads((folder / "summary.json").read_text())
        assert (summary["payload_encryption"], summary["clients_authenticated"]) == (
            encrypt, False)
    assert finals[True].keys() == finals[False].keys()
    for key, value in finals[False].items():
        np.testing.assert_allclose(finals[True][key], value, rtol=0, atol=1e-6)

