"""A real Flower simulation (Ray backend) with a tiny model: 2 clients, 2 rounds."""

import csv
import json

import psutil
import pytest
import torch

from simulations.simulate import simulate
from task.run_settings import RunSettings
from task.runtime import cached_runtime
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.e2e


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def no_leftover_processes():
    before = _descendants()
    yield
    started = []
    for pid in _descendants() - before:
        try:
            started.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(started, timeout=10)  # short-lived helpers may still exit
    for proc in alive:  # stop the rest by PID, then fail the test
        proc.kill()
    assert not alive, f"processes left running: {[(p.pid, p.name()) for p in alive]}"


@pytest.mark.usefixtures("no_leftover_processes")
def test_simulation_writes_results_and_a_loadable_checkpoint(tiny_bert_dir, toy_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    results = tmp_path / "run"
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{
        "num-rounds": 2, "results-dir": str(results), "local-steps": 10, "min-train-nodes": 2,
    })
    records = simulate(config, num_clients=2, gpus_per_client=0.0)

    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["num_accepted"] == 2 and r["num_rejected"] == 0
        assert r["bytes_up"] > 0 and r["bytes_down"] == r["bytes_up"]
        assert r["seconds"] > 0 and 0.0 <= r["eval_accuracy"] <= 1.0
    assert records[2]["eval_loss"] < records[0]["eval_loss"]
    with (results / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    required = {"round", "eval_accuracy", "eval_loss", "bytes_up", "bytes_down", "seconds"}
    assert required <= set(rows[0])
    resolved = json.loads((results / "config.json").read_text())
    assert resolved["num-rounds"] == 2 and resolved["lora-rank"] == 4
    assert (results / "metrics.png").stat().st_size > 0
    assert sorted(p.name for p in (results / "checkpoints").iterdir()) == ["round-001", "round-002"]

    # The checkpoint, loaded with peft into a fresh base model, gives the logits of the
    # in-memory global adapter (held by the server's runtime in this process).
    server_runtime = cached_runtime(RunSettings.from_run_config(config).task)
    batch = server_runtime.tokenizer(["the match and the goal", "bank profit"],
                                     padding=True, return_tensors="pt")
    server_runtime.model.eval()
    with torch.inference_mode():
        expected = server_runtime.model(**batch).logits
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3)
    loaded = PeftModel.from_pretrained(base, str(results / "final_adapter")).eval()
    with torch.inference_mode():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    same_as_last_round = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3),
        str(results / "checkpoints" / "round-002")).eval()
    with torch.inference_mode():
        torch.testing.assert_close(same_as_last_round(**batch).logits, expected, rtol=0, atol=1e-6)
