"""``fedlora generate``: load a run's adapter, stream answers, merge into a standalone model."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simulations.generate import (
    add_generate_parser,
    generate,
    load_for_generation,
    merge_adapter,
    prompt_ids,
)
from task.model import attach_lora, load_base_model
from task.settings import LoraSettings, ModelSettings

INPUT = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])


def make_run(root: Path, task: str = "instruction") -> Any:
    """A results folder as a tiny-llama run writes it; returns the in-memory peft model."""
    base = load_base_model(ModelSettings(model="tiny-llama", task="instruction"), num_labels=0,
                           seed=0)
    peft = attach_lora(base, LoraSettings(lora_rank=4), "instruction", seed=0)
    torch.manual_seed(1)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    peft.eval()
    peft.save_pretrained(str(root / "final_adapter"))
    (root / "config.json").write_text(json.dumps({"model": "tiny-llama", "task": task,
                                                  "seed": 0}))
    return peft


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Any]:
    return tmp_path, make_run(tmp_path)


def test_load_matches_trained_model(run: tuple[Path, Any]) -> None:
    root, peft = run
    model, tokenizer, settings = load_for_generation(str(root), None, None)
    assert torch.allclose(logits(model), logits(peft), atol=1e-6)
    base_only = load_base_model(ModelSettings(model="tiny-llama", task="instruction"),
                                num_labels=0, seed=0)
    assert not torch.allclose(logits(base_only), logits(peft), atol=1e-3)  # adapter matters
    assert settings["model"] == "tiny-llama" and settings["task"] == "instruction"
    assert settings["adapter"] == str(root / "final_adapter")
    assert tokenizer.chat_template


def test_adapter_loads_with_stock_peft(run: tuple[Path, Any]) -> None:
    from peft import PeftModel

    root, peft = run
    base = load_base_model(ModelSettings(model="tiny-llama", task="instruction"), num_labels=0,
                           seed=0)
    model = PeftModel.from_pretrained(base, str(root / "final_adapter"))
    model.eval()
    assert torch.allclose(logits(model), logits(peft), atol=1e-6)


def test_generate_streams_what_it_returns(run: tuple[Path, Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = run
    model, tokenizer, _ = load_for_generation(str(root), None, None)
    outputs: list[torch.Tensor] = []
    original = model.generate

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        outputs.append(out)
        return out

    monkeypatch.setattr(model, "generate", spy)
    stream = io.StringIO()
    text = generate(model, tokenizer, "what is the news?", max_new_tokens=5,
                    system_prompt="be brief", stream=stream)
    assert stream.getvalue() == text
    (out,) = outputs
    ids = prompt_ids(tokenizer, "what is the news?", system_prompt="be brief")
    assert out[0, :len(ids)].tolist() == ids  # the chat template, no extra special tokens
    assert tokenizer.decode(ids).count("be brief") == 1
    new_tokens = out.shape[1] - len(ids)
    assert 1 <= new_tokens <= 5
    # greedy: the same answer again, and none written without a stream
    assert generate(model, tokenizer, "what is the news?", max_new_tokens=5,
                    system_prompt="be brief") == text


def test_generate_plain_template_without_chat_template(run: tuple[Path, Any]) -> None:
    root, _ = run
    model, tokenizer, _ = load_for_generation(str(root), None, None)
    tokenizer.chat_template = None
    stream = io.StringIO()
    text = generate(model, tokenizer, "hello", max_new_tokens=3, stream=stream)
    assert stream.getvalue() == text


def test_merge_writes_a_standalone_model(run: tuple[Path, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, peft = run
    expected = logits(peft)
    model, tokenizer, _ = load_for_generation(str(root), None, None)
    out = root / "merged"
    merge_adapter(model, tokenizer, out)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    merged.eval()
    assert torch.allclose(logits(merged), expected, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == tokenizer.chat_template
    assert not [p for p in root.iterdir() if p.name.startswith(".merged")]  # no temp left
    again, tokenizer, _ = load_for_generation(str(root), None, None)
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_adapter(again, tokenizer, out)
    merge_adapter(again, tokenizer, out, overwrite=True)
    assert (out / "config.json").is_file()


def test_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*--results-dir"):
        load_for_generation(str(missing), None, None)
    (tmp_path / "config.json").write_text(json.dumps({"model": "tiny-llama",
                                                      "task": "instruction", "seed": 0}))
    with pytest.raises(FileNotFoundError, match="final_adapter.*checkpoints"):
        load_for_generation(str(tmp_path), None, None)
    make_run(tmp_path, task="classification")
    with pytest.raises(ValueError, match="task=classification.*causal-lm or instruction"):
        load_for_generation(str(tmp_path), None, None)


def test_adapter_and_model_without_results_folder(run: tuple[Path, Any]) -> None:
    root, peft = run
    model, _, settings = load_for_generation(str(root / "absent"),
                                             str(root / "final_adapter"), "tiny-llama")
    assert settings["task"] == "instruction"
    assert torch.allclose(logits(model), logits(peft), atol=1e-6)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedlora")
    add_generate_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_prompt(run: tuple[Path, Any], capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = run
    args = parser().parse_args(["generate", "--results-dir", str(root), "--prompt", "hi",
                                "--max-new-tokens", "3"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.strip()


def test_cli_stdin_and_merge(run: tuple[Path, Any], capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = run
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nthere\n"))
    args = parser().parse_args(["generate", "--results-dir", str(root),
                                "--max-new-tokens", "3"])
    assert args.func(args) == 0
    assert len(capsys.readouterr().out.split("\n")) == 3  # two answers, each ends a line
    args = parser().parse_args(["generate", "--results-dir", str(root), "--merge",
                                str(root / "merged")])
    assert args.func(args) == 0
    assert (root / "merged" / "config.json").is_file()
    assert args.func(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    args = parser().parse_args(["generate", "--results-dir", str(root / "missing"),
                                "--prompt", "hi"])
    assert args.func(args) == 2
    assert "not found" in capsys.readouterr().err



def test_final_adapter_of_a_model_folder_loads_with_auto_peft(tmp_path: Path) -> None:
    """A run on a model folder saves an adapter that stock peft loads on its own."""
    from peft import AutoPeftModelForCausalLM

    from task.model import load_tokenizer

    folder = tmp_path / "base"
    base = load_base_model(ModelSettings(model="tiny-llama", task="instruction"),
                           num_labels=0, seed=3)
    base.save_pretrained(str(folder))
    load_tokenizer(ModelSettings(model="tiny-llama")).save_pretrained(str(folder))
    model = attach_lora(load_base_model(ModelSettings(model=str(folder), task="instruction"),
                                        num_labels=0), LoraSettings(lora_rank=4),
                        "instruction", seed=0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(str(tmp_path / "final_adapter"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "final_adapter"))
    ids = torch.tensor([[101, 2000, 2001, 2002, 102]])
    model.eval()
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert not torch.allclose(plain, got, atol=1e-3)  # the adapter is applied


def test_a_runs_changes_to_the_base_weights_are_applied_and_merged(run: tuple[Path, Any]) -> None:
    """A strategy that folds updates into the base saves them beside the adapter."""
    from safetensors.numpy import save_file

    from server.results import BASE_DELTAS_FILE
    from task.base_deltas import BaseDeltas, base_weights

    root, peft = run
    rng = np.random.default_rng(0)
    deltas = {f"{name}.base_delta": rng.normal(0, 0.3, w.shape).astype(np.float32)
              for name, w in base_weights(peft).items()}
    save_file(deltas, str(root / "final_adapter" / BASE_DELTAS_FILE))
    BaseDeltas(peft, seed=0).apply(deltas)  # what the run's model computed
    model, tokenizer, _ = load_for_generation(str(root), None, None)
    assert torch.allclose(logits(model), logits(peft), atol=1e-5)
    from transformers import AutoModelForCausalLM

    merge_adapter(model, tokenizer, root / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(root / "merged"))
    merged.eval()
    assert torch.allclose(logits(merged), logits(peft), atol=1e-4)
