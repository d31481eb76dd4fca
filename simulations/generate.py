"""Answer prompts with a trained adapter, streaming tokens, or merge it into a standalone model.

The base model is rebuilt from the run's ``config.json`` (``model``, ``task``, ``seed``:
tiny random models have no folder, so their base is built again from the same seed)
and the adapter is loaded with stock peft (``PeftModel.from_pretrained``). Prompts are
formatted as one user turn under the template the ``instruction`` task trains with (the
tokenizer's chat template with the generation prompt, else the plain ``### Instruction``
template, :mod:`task.tasks.templates`); a ``causal-lm`` run continues the prompt text
as is. Decoding is greedy and stops at the end-of-turn/EOS token
(:func:`task.tasks.generation.stop_token_ids`) or after ``max_new_tokens``.

Heavy libraries (torch, transformers, peft) are imported inside the functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

#: the tasks whose adapters generate text
GENERATIVE_TASKS = ("causal-lm", "instruction")
DEFAULT_RESULTS_DIR = "results/latest"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _run_config(results_dir: str | None, need: bool) -> dict[str, Any]:
    """The results folder's ``config.json`` ({} without a folder when ``need`` is False)."""
    if results_dir is None:
        return {}
    root = Path(results_dir).expanduser()
    if not root.is_dir():
        if not need:
            return {}
        raise FileNotFoundError(
            f"results folder {root} not found: pass --results-dir <the run's results folder> "
            "(the simulation's results-dir), or --adapter <adapter folder> with --model")
    path = root / "config.json"
    if not path.is_file():
        if not need:
            return {}
        raise FileNotFoundError(
            f"{path} not found: {root} is not a fedlora results folder; pass the folder a run "
            "wrote, or --adapter <adapter folder> with --model")
    return _read_json(path)


def load_for_generation(
    results_dir: str | None, adapter: str | None = None, model: str | None = None, *,
    device: str = "auto",
) -> tuple[PeftModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """The base model with a trained adapter on top, its tokenizer, and the run's settings.

    ``results_dir``: a run's results folder; its ``config.json`` gives ``model``, ``task``
    and ``seed`` and its ``final_adapter/`` the adapter. ``adapter``: another adapter
    folder (a ``checkpoints/round-NNN``, say). ``model``: the base model instead of the
    run's (needed when there is no results folder). The settings returned are the run
    config with the ``model``, ``task``, ``seed`` and ``adapter`` actually used.

    Raises:
        FileNotFoundError: no results folder, config.json or adapter folder.
        ValueError: a classification run (or adapter), or no way to tell the base model.

    """
    from peft import PeftModel

    from server.results import BASE_DELTAS_FILE
    from task.model import load_base_model, load_tokenizer, select_device
    from task.settings import ModelSettings

    config = _run_config(results_dir, need=adapter is None or model is None)
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
    elif results_dir is not None:
        adapter_dir = Path(results_dir).expanduser() / "final_adapter"
    else:
        raise ValueError("no adapter to load: pass a results folder or an adapter folder")
    adapter_config = adapter_dir / "adapter_config.json"
    if not adapter_config.is_file():
        hint = ("the run has not finished (its final adapter is written after the last "
                "round); pass --adapter <results>/checkpoints/round-NNN for a checkpoint"
                if adapter is None else "pass a folder written by peft's save_pretrained")
        raise FileNotFoundError(f"no adapter at {adapter_dir} (no adapter_config.json): {hint}")
    peft_config = _read_json(adapter_config)
    task = str(config.get("task", "instruction"))
    task_type = peft_config.get("task_type")
    needs = f"generation needs an adapter trained with task={' or '.join(GENERATIVE_TASKS)}"
    if task not in GENERATIVE_TASKS:
        raise ValueError(f"results folder {results_dir} is a task={task} run: {needs}")
    if task_type and task_type != "CAUSAL_LM":
        raise ValueError(f"adapter {adapter_dir} has task_type {task_type}: {needs}")
    base_name = model or config.get("model") or peft_config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"cannot tell the base model of {adapter_dir}: pass --model")
    seed = int(config.get("seed", 0))
    settings = ModelSettings(model=str(base_name), task=task)
    base = load_base_model(settings, num_labels=0, seed=seed)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    apply_base_deltas(peft_model, adapter_dir / BASE_DELTAS_FILE)
    peft_model.to(select_device(device))
    peft_model.eval()
    tokenizer = load_tokenizer(settings)
    used = {**config, "model": str(base_name), "task": task, "seed": seed,
            "adapter": str(adapter_dir)}
    return peft_model, tokenizer, used


def apply_base_deltas(model: PeftModel, path: Path) -> None:
    """Add the run's changes to the frozen base weights, if it made any.

    Strategies that fold their updates into the base (``base_deltas.safetensors`` beside
    the adapter) are not the adapter alone; :meth:`merge_and_unload` then merges them too.
    """
    if not path.exists():
        return
    from safetensors.numpy import load_file

    from task.base_deltas import BaseDeltas

    BaseDeltas(model, seed=0).apply(load_file(str(path)))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, *, system_prompt: str = "",
               template: bool = True) -> list[int]:
    """The token ids of ``prompt`` as the model sees it in training.

    With ``template`` (the instruction task): one user turn (after the system prompt, if
    any) under the chat template with the generation prompt, or the plain template;
    without: the raw text (a ``causal-lm`` continuation).
    """
    from task.tasks.templates import format_texts, has_chat_template

    if not template:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    turns = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    turns.append({"role": "user", "content": prompt})
    text, _ = format_texts(tokenizer, turns, "")
    chat = has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def _streamer(tokenizer: PreTrainedTokenizerBase, stream: TextIO | None,
              stops: list[int]) -> Any:
    """A ``TextStreamer`` writing to ``stream`` that keeps the text and drops stop tokens."""
    import torch
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.parts: list[str] = []

        def put(self, value: torch.Tensor) -> None:
            if self.skip_prompt and self.next_tokens_are_prompt:
                super().put(value)
                return
            kept = [t for t in value.reshape(-1).tolist() if t not in stops]
            if kept:
                super().put(torch.tensor(kept, dtype=torch.long))

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not text:
                return
            self.parts.append(text)
            if stream is not None:
                stream.write(text)
                stream.flush()

    return Streamer()


def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, *,
             max_new_tokens: int = 128, system_prompt: str = "", stream: TextIO | None = None,
             template: bool = True) -> str:
    """Greedily answer ``prompt``, writing the answer's text to ``stream`` as it comes.

    The prompt is one user turn under the instruction task's template (see
    :func:`prompt_ids`; ``template=False``: raw text to continue). Decoding stops at a
    stop token (:func:`task.tasks.generation.stop_token_ids`) or after
    ``max_new_tokens``; special tokens are left out. Returns the answer: exactly the
    text written to ``stream``.
    """
    import torch

    from task.tasks.generation import stop_token_ids

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = prompt_ids(tokenizer, prompt, system_prompt=system_prompt, template=template)
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    streamer = _streamer(tokenizer, stream, stops)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    model.eval()
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                       use_cache=True, pad_token_id=pad_id, eos_token_id=stops or None,
                       streamer=streamer)
    return "".join(streamer.parts)


def merge_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                  *, overwrite: bool = False) -> torch.nn.Module:
    """Merge the adapter into the base weights and save a standalone model folder.

    The folder (model and tokenizer, ``save_pretrained``) loads with
    ``AutoModelForCausalLM.from_pretrained`` and serves as ``model=<folder>``. It is
    written to a temporary sibling and renamed into place. ``model`` is merged in place
    (its LoRA layers are gone afterwards); the merged plain model is returned.

    Raises:
        FileExistsError: ``out_dir`` exists and is not an empty folder (pass
            ``overwrite=True`` to replace it).

    """
    out = Path(out_dir).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty: choose another folder, "
                              "or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = model.merge_and_unload()
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return merged


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``generate`` subcommand on ``sub`` (``add_subparsers``'s result)."""
    p = sub.add_parser(
        "generate",
        help="answer a prompt with a trained adapter, streaming tokens; or merge it into a "
        "standalone model",
        description="Load a run's base model and trained LoRA adapter and answer prompts "
        "greedily, streaming tokens (one --prompt; else one prompt per line of stdin, "
        "a chat loop on a terminal), or merge the adapter into a standalone model folder.",
    )
    p.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                   help="the run's results folder (its config.json and final_adapter/; "
                   f"default {DEFAULT_RESULTS_DIR})")
    p.add_argument("--adapter", help="adapter folder instead of <results-dir>/final_adapter "
                   "(e.g. <results-dir>/checkpoints/round-003)")
    p.add_argument("--model", help="base model instead of the run's (model= syntax)")
    p.add_argument("--prompt", help="the prompt to answer (default: read prompts from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="most tokens to generate per answer (default 128)")
    p.add_argument("--system-prompt", default=None,
                   help="system prompt (default: the run's system-prompt)")
    p.add_argument("--merge", metavar="OUT",
                   help="merge the adapter into the base model and save it to OUT; exits "
                   "after, unless --prompt is given too")
    p.add_argument("--overwrite", action="store_true",
                   help="let --merge replace an existing non-empty folder")
    p.set_defaults(func=run_generate)
    return p


def run_generate(args: argparse.Namespace) -> int:
    """The ``generate`` command: load, then merge and/or answer; the exit code."""
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        model, tokenizer, settings = load_for_generation(args.results_dir, args.adapter,
                                                         args.model)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    system = (args.system_prompt if args.system_prompt is not None
              else str(settings.get("system-prompt", "") or ""))
    template = settings["task"] == "instruction"
    if args.merge:
        try:
            model = merge_adapter(model, tokenizer, args.merge, overwrite=args.overwrite)
        except FileExistsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"merged model written to {args.merge}", file=sys.stderr)
        if args.prompt is None:
            return 0

    def answer(prompt: str) -> None:
        generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                 system_prompt=system, stream=sys.stdout, template=template)
        sys.stdout.write("\n")
        sys.stdout.flush()

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                break
            if line.strip():
                answer(line.strip())
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    if interactive:
        sys.stdout.write("\n")
    return 0
