"""Instruction tuning end to end through Flower's simulation engine (tiny LLaMA, 2 clients).

Every strategy, DP-SGD, payload encryption and resume on a tiny Alpaca file; the
causal-LM task on plain texts with the default partitioner; and a run in which every
client fails in every round, which must fail loudly instead of "finishing".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.run import FederatedRun
from simulations.simulate import simulate
from tests.e2e.test_simulation import no_leftover_processes  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_leftover_processes")]

COLOURS = ("red", "green", "blue")
GENERATION_SCORES = ("eval_loss", "eval_perplexity", "eval_exact_match", "eval_rouge_l")
#: every client asks for all the CPUs, so Ray runs one actor that serves both clients in
#: turn: torch is imported and the model built once per run, not once per client (less
#: CPU on small shared machines; the other e2e tests cover clients in separate actors)
ONE_ACTOR = {"cpus_per_client": float(os.cpu_count() or 1), "gpus_per_client": 0.0}


@pytest.fixture(scope="module")
def alpaca_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 Alpaca records: "Say colour number i%3" -> red/green/blue; every third has input.

    ``kind`` (``input`` or ``plain``) is there for ``group-column``.
    """
    path = tmp_path_factory.mktemp("instruction-data") / "colours.jsonl"
    with path.open("w") as fh:
        for i in range(60):
            record = {"instruction": f"Say colour number {i % 3}",
                      "input": f"item {i}" if i % 3 == 0 else "",
                      "output": COLOURS[i % 3], "kind": "input" if i % 3 == 0 else "plain"}
            fh.write(json.dumps(record) + "\n")
    return path


def instruction_config(dataset: Path, results: Path, **extra: object) -> dict[str, object]:
    """A short instruction run: 2 rounds, 2 local steps, 3 new tokens, 2 samples."""
    config: dict[str, object] = {
        "task": "instruction", "model": "tiny-llama", "dataset": str(dataset),
        "results-dir": str(results), "num-rounds": 2, "local-steps": 2, "batch-size": 4,
        "max-length": 48, "max-new-tokens": 3, "eval-samples": 2, "eval-batch-size": 16,
        "lora-rank": 4, "lora-alpha": 8.0, "learning-rate": 0.01,
    }
    config.update(extra)
    return config


def assert_instruction_results(results: Path, records: list[dict], num_clients: int = 2) -> None:
    """Every round accepted every client; scores, samples, adapter and summary are there."""
    rounds = [r["round"] for r in records]
    assert rounds == list(range(len(records)))
    for r in records[1:]:
        assert r["num_sampled"] == num_clients, r
        assert r["num_accepted"] == r["num_sampled"], r
    evaluated = [r for r in records if r.get("eval_loss") is not None]
    assert {r["round"] for r in evaluated} >= {0, rounds[-1]}
    for r in evaluated:
        for key in GENERATION_SCORES:
            assert r.get(key) is not None, (key, r)
        assert 0.0 <= r["eval_exact_match"] <= 1.0 and 0.0 <= r["eval_rouge_l"] <= 1.0
    for r in evaluated:
        path = results / "samples" / f"round-{r['round']:03d}.jsonl"
        samples = [json.loads(line) for line in path.read_text().splitlines() if line]
        assert len(samples) == 2, path
        for sample in samples:
            assert {"prompt", "reference", "generated"} <= set(sample)
            assert sample["reference"] in COLOURS
            assert "colour number" in sample["prompt"].lower()
    assert (results / "final_adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((results / "summary.json").read_text())
    assert summary["metric"] == "rouge_l"
    assert summary["no_update_accepted"] is None


STRATEGIES = {
    "fedit": {"group-column": "kind"},  # generation scores per kind too
    "ffa-lora": {},
    "fedsa-lora": {},
    "hetlora": {"client-ranks": "2,4"},
    "flexlora": {"client-ranks": "2,4"},
    "slora": {"slora-rounds": 1, "slora-density": 0.1},  # 1 sparse round, then 1 of LoRA
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_tunes_instructions(tmp_path, alpaca_jsonl, strategy):
    results = tmp_path / strategy
    config = instruction_config(alpaca_jsonl, results, strategy=strategy,
                                **STRATEGIES[strategy])
    records = simulate(config, num_clients=2, **ONE_ACTOR)
    assert_instruction_results(results, records)
    if strategy == "slora":
        assert [r.get("stage") for r in records] == [None, 1.0, 2.0]
    if strategy == "fedit":
        for r in (records[0], records[-1]):
            assert {f"eval_{kind}_{score}" for kind in ("input", "plain")
                    for score in ("exact_match", "rouge_l")} <= set(r)
        samples = (results / "samples" / "round-002.jsonl").read_text().splitlines()
        assert all(json.loads(line)["group"] in ("input", "plain") for line in samples)
    if strategy in ("hetlora", "flexlora"):
        details = json.loads((results / "details.json").read_text())
        assert sorted(details["1"]["client_ranks"].values()) == [2, 4]


def test_dp_sgd_on_instructions_reports_epsilon(tmp_path, alpaca_jsonl):
    results = tmp_path / "dp"
    config = instruction_config(alpaca_jsonl, results, **{
        "num-rounds": 1, "dp": True, "dp-noise-multiplier": 1.0, "dp-delta": 1e-3})
    records = simulate(config, num_clients=2, **ONE_ACTOR)
    assert_instruction_results(results, records)
    assert records[1]["dp_epsilon_max"] > 0
    epsilons = json.loads((results / "details.json").read_text())["1"]["client_epsilon"]
    assert len(epsilons) == 2 and max(epsilons.values()) == records[1]["dp_epsilon_max"]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["dp_private_against_server"] is True


def test_encrypted_payloads_with_instructions(tmp_path, alpaca_jsonl):
    results = tmp_path / "encrypted"
    config = instruction_config(alpaca_jsonl, results, **{
        "num-rounds": 1, "encrypt-payloads": True})
    records = simulate(config, num_clients=2, **ONE_ACTOR)
    assert_instruction_results(results, records)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["payload_encryption"] is True


class SimulatedCrash(RuntimeError):
    pass


def test_an_interrupted_instruction_run_resumes_and_finishes(tmp_path, alpaca_jsonl,
                                                             monkeypatch):
    results = tmp_path / "resumed"
    config = instruction_config(alpaca_jsonl, results)
    save_state = FederatedRun.save_state

    def crash_after_round_one(self, server_round, arrays):
        save_state(self, server_round, arrays)
        if server_round == 1:
            raise SimulatedCrash("the server dies after saving round 1")

    monkeypatch.setattr(FederatedRun, "save_state", crash_after_round_one)
    with pytest.raises(SimulatedCrash):  # the ServerApp's exception ends the simulation
        simulate(config, num_clients=2, **ONE_ACTOR)
    monkeypatch.setattr(FederatedRun, "save_state", save_state)
    interrupted = json.loads((results / "metrics.json").read_text())
    assert [r["round"] for r in interrupted] == [0, 1]

    records = simulate({**config, "resume": True}, num_clients=2, **ONE_ACTOR)

    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[1]["eval_loss"] == interrupted[1]["eval_loss"]  # the saved round
    assert_instruction_results(results, records)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["resumed_after_round"] == 1


def test_causal_lm_on_plain_texts_with_the_default_partitioner(tmp_path):
    """The user guide's ``--task causal-lm --dataset ./notes.jsonl``: only a ``text`` column.

    The default partitioner used to be Dirichlet over labels for every task, so every
    client failed on data without a label column; ``auto`` is IID for causal LM.
    """
    data = tmp_path / "notes.jsonl"
    with data.open("w") as fh:
        for i in range(60):
            fh.write(json.dumps({"text": f"note {i}: the {COLOURS[i % 3]} box is on shelf "
                                         f"{i % 5}"}) + "\n")
    results = tmp_path / "causal"
    config = {"task": "causal-lm", "model": "tiny-gpt2", "dataset": str(data),
              "results-dir": str(results), "num-rounds": 1, "local-steps": 2,
              "batch-size": 4, "max-length": 24, "lora-rank": 4, "lora-alpha": 8.0,
              "learning-rate": 0.01, "eval-batch-size": 16}
    records = simulate(config, num_clients=2, **ONE_ACTOR)
    assert [r["round"] for r in records] == [0, 1]
    assert (records[1]["num_sampled"], records[1]["num_accepted"]) == (2, 2)
    assert records[1]["eval_perplexity"] > 0
    resolved = json.loads((results / "config.json").read_text())
    assert resolved["partitioner"] == "auto"
    summary = json.loads((results / "summary.json").read_text())
    assert summary["metric"] == "perplexity" and summary["no_update_accepted"] is None


def test_a_run_whose_every_client_fails_fails_loudly(tmp_path, alpaca_jsonl, monkeypatch):
    import client.app
    from tests.e2e.faulty_client import make_faulty_client_app

    def failing_client_app(overrides, node_overrides=None):  # every client, every round
        return make_faulty_client_app(overrides, {0: ("fail", "fail"), 1: ("fail", "fail")})

    monkeypatch.setattr(client.app, "make_client_app", failing_client_app)
    results = tmp_path / "failed"
    config = instruction_config(alpaca_jsonl, results)
    with pytest.raises(RuntimeError, match="no client update was accepted") as raised:
        simulate(config, num_clients=2, **ONE_ACTOR)
    assert "injected failure" in str(raised.value)  # the first failure, quoted
    summary = json.loads((results / "summary.json").read_text())
    assert "no client update was accepted in any of 2 round(s) (4 failed, 0 rejected)" in \
        summary["no_update_accepted"]
