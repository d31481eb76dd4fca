"""The LLM benchmarks' wiring on tiny-llama: same batches, same loss, the reported keys.

Timings are not asserted (they mean nothing on a tiny model or a shared machine).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:  # federation_overhead imports baseline_app from there
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llm_step() -> ModuleType:
    return load_bench("llm_step")


@pytest.fixture(scope="module")
def bench(llm_step: ModuleType, tmp_path_factory: pytest.TempPathFactory):
    return llm_step.build("tiny-llama", batch_size=4, max_length=160,
                          workdir=tmp_path_factory.mktemp("llm-step"))


def test_both_loops_see_the_same_batches_and_loss(llm_step, bench):
    measured = llm_step.measure(bench, steps=2, repeats=1, warmup=2)
    result = llm_step.summarise(bench, measured, steps=2, repeats=1, warmup=2)
    json.loads(json.dumps(result))  # what --json prints
    for key in ("llm_step_overhead", "plain_step_s", "fedlora_step_s", "fedlora_inner_step_s",
                "first_step_loss_fedlora", "first_step_loss_plain", "same_batches",
                "lora_init_identical", "base_weights_identical", "block_step_s",
                "block_first_loss", "torch_threads", "batch_shapes"):
        assert key in result, key
    assert result["llm_step_overhead"] > 0
    assert result["same_batches"] is True
    assert result["lora_init_identical"] and result["base_weights_identical"]
    assert [s[0] for s in result["batch_shapes"]] == [4, 4]
    assert result["first_step_loss_fedlora"] == pytest.approx(result["first_step_loss_plain"],
                                                              rel=1e-5)
    assert result["block_first_loss"]["fedlora"] == pytest.approx(
        result["block_first_loss"]["plain"], rel=1e-5)
    assert len(result["block_step_s"]["plain"]) == len(result["block_step_s"]["fedlora"]) == 1


def test_a_different_batch_is_detected(llm_step, bench):
    plan = llm_step.batch_plan(len(bench.data), 4, seed=0, steps=2)
    with llm_step.recorded_batches() as seen:
        llm_step.run_block(bench, "fedlora", 2, seed=0)
    rows = llm_step.plan_rows(bench.data, plan)
    assert llm_step.same_batches(seen, plan, bench.plain, rows)
    other = llm_step.batch_plan(len(bench.data), 4, seed=1, steps=2)
    assert not llm_step.same_batches(seen, other, bench.plain, llm_step.plan_rows(bench.data,
                                                                                   other))
    shifted = [(ids, [p + 1 for p in prompts]) for ids, prompts in rows]  # labels differ
    assert not llm_step.same_batches(seen, plan, bench.plain, shifted)


def test_gradient_checkpointing_gives_the_same_first_loss(llm_step, tmp_path):
    gc = llm_step.build("tiny-llama", batch_size=4, max_length=160,
                        gradient_checkpointing=True, workdir=tmp_path)
    assert gc.variants == ["plain", "fedlora", "fedlora_gc"]
    checks = llm_step.check_block(gc, 1, seed=0)
    assert checks["first_step_loss_fedlora_gc"] == pytest.approx(
        checks["first_step_loss_fedlora"], rel=1e-5)


def test_memory_child_reports_peaks(llm_step, bench, tmp_path):
    plan = llm_step.batch_plan(len(bench.data), 4, seed=0, steps=1)
    spec = {"model": "tiny-llama", "batch_size": 4, "max_length": 160, "memory_steps": 1,
            "threads": 0, "seed": 0, "rows": llm_step.plan_rows(bench.data, plan),
            "folder": llm_step.plain_model_folder(bench.settings, tmp_path)}
    out = llm_step.memory_child("plain", spec)
    assert out["peak_rss_mb"] >= out["peak_rss_during_steps_mb"] > 0
    assert out["rss_after_build_mb"] > 0


def test_federation_overhead_llm_case_settings():
    fed = load_bench("federation_overhead")
    config = fed.llm_run_config()
    assert config["task"] == "instruction" and config["eval-generate"] is False
    assert config["batch-size"] == 8 and config["max-length"] == 160
    assert "results-dir" not in config and "local-steps" not in config
    assert fed.LLM_DEFAULTS["clients"] == 2 and fed.LLM_DEFAULTS["model"] == "smollm2"
