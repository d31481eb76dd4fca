"""LLM local training step: fedlora's ``train_local`` vs a plain PEFT loop, on SmolLM2.

Why one module of about 650 lines: a benchmark is one self-contained script (both arms,
the timing hooks and the report) so that its figures can be reproduced from one file.

The client's local training on the embedded LLM (the ``smollm2-bbc`` preset's task:
SmolLM2-135M-Instruct, ``instruction`` on ``bbc-news-instruct``, response-only loss,
batch 8, max-length 160, LoRA r=8 on q_proj/v_proj, AdamW lr 3e-3), side by side with
the loop one would write by hand, in one process, on the same batches:

- fedlora: ``TaskRuntime.build(TaskSettings.from_run_config(...))``, the client's
  partition (``encoded_partition(0, 2)``) and ``task.training.train_local`` (batches
  drawn by ``sample_batches``, collated by the task, the task's loss), as the ClientApp
  calls it;
- plain: ``AutoModelForCausalLM.from_pretrained`` on the same model folder, peft's
  ``get_peft_model`` with the same ``LoraConfig``, padding and label masking written
  here (prompt and padding -> -100), ``model(**batch).loss``, ``torch.optim.AdamW``; it
  reads the same token ids in the same order (the index sequence ``train_local`` draws
  for the block's seed);
- with ``--gradient-checkpointing``, also fedlora with ``gradient-checkpointing=true``.

Threads: ``--threads 1`` by default, as a client of a simulation trains (Ray gives it one
CPU and sets ``OMP_NUM_THREADS=1``); on a shared machine it is also the stable setting
(on two cores busy with other work, two threads ran SmolLM2's forward and backward about
4x slower than one: 29-32 s against 7-8 s). ``--threads 0`` leaves torch's default. CPU
time (``time.process_time``, all threads) is reported beside wall time, and
``llm_step_overhead_cpu`` from it.

Timing: one block = one call of ``--steps`` optimizer steps (a fresh AdamW, as every
client round has), from the call to its return; per-step time = block / steps. Every
variant first runs ``--warmup`` untimed steps; then ``--repeats`` rounds of one block
each, the order rotating each round (A B, B A, ...). Both start every block from the
same adapter (the initial one) and the same seed, so they compute the same thing.
``llm_step_overhead`` = median fedlora per-step time / median plain per-step time.

Checks (the warm-up blocks): fedlora's batches are recorded as ``train_local`` collates
them and compared with the plain loop's (token ids, mask, labels, equal); the first-step
losses of both are printed and compared; the LoRA initialisation of the plain model is
compared with fedlora's (same seed) before fedlora's is copied into it.

Memory: each variant again in its own process (``--memory-steps`` steps; medians of
``--memory-repeats`` processes each, as with glibc's allocator the peak varies by up to
10% from run to run): peak RSS (``VmHWM``; ``ru_maxrss`` would carry over this process's,
which forks them), RSS after building model and data, and the peak sampled during the
steps (``/proc/self/statm``); ``--no-memory`` skips it.

Run time with the defaults on SmolLM2 (one thread, about 7 s a step): some 5 minutes of
timing (plus 3 with ``--gradient-checkpointing``) and 4-5 minutes of memory processes.

Usage: python bench/llm_step.py [--json] [--model smollm2] [--steps 5] [--repeats 4]
  [--warmup 2] [--threads 1] [--batch-size 8] [--max-length 160]
  [--gradient-checkpointing] [--memory-steps 2] [--memory-repeats 3] [--no-memory]
A quick check of the wiring: --model tiny-llama --steps 2 --repeats 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from simulations.presets import SMOLLM2_BBC
from task.model import (
    TINY_MODELS,
    enable_checkpointing,
    load_base_model,
    load_tokenizer,
    resolve_model_source,
)
from task.runtime import TaskRuntime
from task.settings import ModelSettings, TaskSettings
from task.training import Encoded, sample_batches, train_local

IGNORE = -100
PARTITION, NUM_PARTITIONS = 0, SMOLLM2_BBC.num_clients  # client 0 of the preset's two
TARGET_MODULES = ["q_proj", "v_proj"]
VARIANTS = ("plain", "fedlora", "fedlora_gc")
LABELS = {"plain": "plain PEFT loop", "fedlora": "fedlora train_local",
          "fedlora_gc": "fedlora + gradient checkpointing"}


# --- configuration -----------------------------------------------------------------------

def run_config(model: str = "smollm2", *, batch_size: int = 8, max_length: int = 160,
               gradient_checkpointing: bool = False) -> dict[str, Any]:
    """The preset's task settings, with this model, batch and length."""
    keep = ("task", "dataset", "group-column", "test-fraction", "lora-rank", "lora-alpha",
            "learning-rate")
    config = {k: SMOLLM2_BBC.run_config[k] for k in keep}
    config.update({"model": model, "batch-size": batch_size, "max-length": max_length,
                   "target-modules": ",".join(TARGET_MODULES), "lora-dropout": 0.0,
                   "weight-decay": 0.0, "precision": "auto",
                   "gradient-checkpointing": gradient_checkpointing})
    return config


def task_settings(config: dict[str, Any]) -> TaskSettings:
    return TaskSettings.from_run_config(config)


def plain_model_folder(settings: TaskSettings, workdir: Path) -> str:
    """The folder the plain loop loads: the model's own, or a tiny model saved to disk."""
    if settings.model.model not in TINY_MODELS:
        return resolve_model_source(settings.model.model).path
    folder = workdir / settings.model.model
    if not (folder / "config.json").is_file():
        model = ModelSettings(model=settings.model.model, task=settings.model.task)
        base: Any = load_base_model(model, num_labels=0, seed=settings.train.seed)
        base.save_pretrained(folder)
        load_tokenizer(model).save_pretrained(folder)
    return str(folder)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the plain loop ----------------------------------------------------------------------

@dataclasses.dataclass
class PlainLoop:
    """A single-process PEFT training loop, written as one would without fedlora."""

    model: Any
    pad_id: int
    device: torch.device
    autocast: torch.dtype | None

    @classmethod
    def build(cls, folder: str, settings: TaskSettings, device: torch.device,
              autocast: torch.dtype | None) -> PlainLoop:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        base = AutoModelForCausalLM.from_pretrained(folder)
        if settings.model.gradient_checkpointing:
            enable_checkpointing(base)
        lora = settings.lora
        config = LoraConfig(r=lora.lora_rank, lora_alpha=lora.lora_alpha,  # type: ignore[arg-type]
                            lora_dropout=lora.lora_dropout, target_modules=TARGET_MODULES,
                            task_type="CAUSAL_LM")
        torch.manual_seed(settings.train.seed)  # the seed fedlora initialises LoRA from
        model = get_peft_model(base, config).to(device)
        return cls(model=model, pad_id=int(pad_id), device=device, autocast=autocast)

    def collate(self, rows: Sequence[Sequence[int]],
                prompt_lengths: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right padding; labels = the ids from the prompt's end on, -100 elsewhere."""
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (ids, prompt) in enumerate(zip(rows, prompt_lengths, strict=True)):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention_mask[i, :len(ids)] = 1
            labels[i, prompt:len(ids)] = input_ids[i, prompt:len(ids)]
        return {"input_ids": input_ids.to(self.device),
                "attention_mask": attention_mask.to(self.device),
                "labels": labels.to(self.device)}

    def train(self, steps: Sequence[tuple[list[list[int]], list[int]]],
              learning_rate: float) -> list[float]:
        """One optimizer step per (rows, prompt lengths); the losses."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        self.model.train()
        losses = []
        for rows, prompts in steps:
            optimizer.zero_grad(set_to_none=True)
            batch = self.collate(rows, prompts)
            ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
                   else contextlib.nullcontext())
            with ctx:
                loss = self.model(**batch).loss
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses


# --- batches, adapters -------------------------------------------------------------------

def batch_plan(n: int, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The example indices of each step, as ``train_local`` draws them for ``seed``."""
    batches = sample_batches(n, batch_size, torch.Generator().manual_seed(seed))
    return [next(batches) for _ in range(steps)]


def plan_rows(data: Encoded, plan: Sequence[Sequence[int]]
              ) -> list[tuple[list[list[int]], list[int]]]:
    """The plain loop's input: the token ids and prompt lengths of each step's examples."""
    prompts = data.prompt_lengths or [0] * len(data)
    return [([list(data.input_ids[i]) for i in idx], [prompts[i] for i in idx])
            for idx in plan]


@contextlib.contextmanager
def recorded_batches() -> Iterator[list[tuple[list[int], dict[str, torch.Tensor]]]]:
    """Record what ``train_local`` collates: (indices, batch on the CPU) per mini-batch."""
    import task.training as training

    original = training.make_batch
    seen: list[tuple[list[int], dict[str, torch.Tensor]]] = []

    def recording(encoded: Encoded, indices: list[int], tokenizer: Any,
                  device: torch.device) -> dict[str, torch.Tensor]:
        batch = original(encoded, indices, tokenizer, device)
        seen.append((list(indices), {k: v.detach().cpu().clone() for k, v in batch.items()}))
        return batch

    training.make_batch = recording
    try:
        yield seen
    finally:
        training.make_batch = original


def same_batches(seen: Sequence[tuple[list[int], dict[str, torch.Tensor]]],
                 plan: Sequence[Sequence[int]], plain: PlainLoop,
                 rows: Sequence[tuple[list[list[int]], list[int]]]) -> bool:
    """Whether fedlora's recorded batches are the plan's, token for token, as the plain loop's.

    Padding ids may differ (the masks and labels ignore them), so ids are compared
    where the attention mask is 1.
    """
    if [s[0] for s in seen] != [list(p) for p in plan]:
        return False
    for (_, fed), (ids, prompts) in zip(seen, rows, strict=True):
        mine = {k: v.cpu() for k, v in plain.collate(ids, prompts).items()}
        if set(fed) != set(mine) or any(fed[k].shape != mine[k].shape for k in mine):
            return False
        mask = mine["attention_mask"].bool()
        if not (torch.equal(fed["attention_mask"], mine["attention_mask"])
                and torch.equal(fed["labels"], mine["labels"])
                and torch.equal(fed["input_ids"][mask], mine["input_ids"][mask])):
            return False
    return True


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}


# --- the measured blocks -----------------------------------------------------------------

@dataclasses.dataclass
class Bench:
    """Everything one run measures: the variants, the data, the initial adapter."""

    runtimes: dict[str, TaskRuntime]  # fedlora, and fedlora_gc when asked
    plain: PlainLoop
    data: Encoded
    initial: dict[str, torch.Tensor]
    settings: TaskSettings
    lora_init_identical: bool
    base_weights_identical: bool

    @property
    def device(self) -> torch.device:
        return self.runtimes["fedlora"].device

    @property
    def variants(self) -> list[str]:
        return ["plain", *self.runtimes]


def build(model: str = "smollm2", *, batch_size: int = 8, max_length: int = 160,
          gradient_checkpointing: bool = False, workdir: Path) -> Bench:
    """Build fedlora's runtime(s) and the plain loop, with one initial adapter for all."""
    config = run_config(model, batch_size=batch_size, max_length=max_length)
    settings = task_settings(config)
    runtimes = {"fedlora": TaskRuntime.build(settings)}
    if gradient_checkpointing:
        runtimes["fedlora_gc"] = TaskRuntime.build(task_settings(
            {**config, "gradient-checkpointing": True}))
    fed = runtimes["fedlora"]
    data = fed.encoded_partition(PARTITION, NUM_PARTITIONS)
    plain = PlainLoop.build(plain_model_folder(settings, workdir), settings, fed.device,
                            fed.autocast)
    initial = trainable_state(fed.model)
    lora_init_identical = same_tensors(trainable_state(plain.model), initial)
    base_identical = same_tensors(frozen_state(plain.model), frozen_state(fed.model))
    return Bench(runtimes=runtimes, plain=plain, data=data, initial=initial,
                 settings=settings, lora_init_identical=lora_init_identical,
                 base_weights_identical=base_identical)


@dataclasses.dataclass
class Block:
    variant: str
    steps: int
    seconds: float  # the whole call, from start to return
    cpu_seconds: float  # this process's CPU time over the call (all threads)
    losses: list[float]  # plain: every step; fedlora: first and last
    inner_seconds: float | None = None  # fedlora's own train-seconds

    @property
    def per_step(self) -> float:
        return self.seconds / self.steps

    @property
    def cpu_per_step(self) -> float:
        return self.cpu_seconds / self.steps


def run_block(bench: Bench, variant: str, steps: int, seed: int) -> Block:
    """``steps`` optimizer steps from the initial adapter, on the batches of ``seed``."""
    device = bench.device
    if variant == "plain":
        load_trainable(bench.plain.model, bench.initial)
        rows = plan_rows(bench.data, batch_plan(len(bench.data), bench.settings.train.batch_size,
                                                seed, steps))
        torch.manual_seed(seed)
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        losses = bench.plain.train(rows, bench.settings.train.learning_rate)
        sync(device)
        return Block(variant, steps, time.perf_counter() - start, time.process_time() - cpu,
                     losses)
    runtime = bench.runtimes[variant]
    load_trainable(runtime.model, bench.initial)
    train = dataclasses.replace(runtime.settings.train, local_steps=steps, local_epochs=0)
    torch.manual_seed(seed)  # as the client seeds its dropout stream
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    result = train_local(runtime.model, runtime.tokenizer, bench.data, train, device=device,
                         autocast=runtime.autocast, seed=seed)
    sync(device)
    return Block(variant, steps, time.perf_counter() - start, time.process_time() - cpu,
                 [result.loss_first, result.loss_last], result.seconds)


def check_block(bench: Bench, steps: int, seed: int) -> dict[str, Any]:
    """The warm-up: fedlora's batches recorded, the plain loop on the same; the checks."""
    plan = batch_plan(len(bench.data), bench.settings.train.batch_size, seed, steps)
    with recorded_batches() as seen:
        fed = run_block(bench, "fedlora", steps, seed)
    plain = run_block(bench, "plain", steps, seed)
    out = {
        "same_batches": same_batches(seen, plan, bench.plain, plan_rows(bench.data, plan)),
        "batch_shapes": [list(b["input_ids"].shape) for _, b in seen],
        "first_step_loss_fedlora": fed.losses[0],
        "first_step_loss_plain": plain.losses[0],
        "first_step_loss_abs_diff": abs(fed.losses[0] - plain.losses[0]),
        "last_warmup_loss_fedlora": fed.losses[-1],
        "last_warmup_loss_plain": plain.losses[-1],
    }
    for variant in bench.variants[2:]:  # gradient checkpointing: same loss, recomputed
        out[f"first_step_loss_{variant}"] = run_block(bench, variant, steps, seed).losses[0]
    return out


def measure(bench: Bench, *, steps: int, repeats: int, warmup: int,
            seed: int = 0) -> dict[str, Any]:
    """Warm-up (with the checks), then ``repeats`` rounds of one block per variant."""
    checks = check_block(bench, max(1, warmup), seed)
    blocks: dict[str, list[Block]] = {v: [] for v in bench.variants}
    variants = bench.variants
    for r in range(repeats):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            blocks[variant].append(run_block(bench, variant, steps, seed + 1 + r))
    return {"checks": checks, "blocks": blocks}


def summarise(bench: Bench, measured: dict[str, Any], *, steps: int, repeats: int,
              warmup: int) -> dict[str, Any]:
    blocks: dict[str, list[Block]] = measured["blocks"]
    med = {v: statistics.median(b.per_step for b in bs) for v, bs in blocks.items()}
    cpu = {v: statistics.median(b.cpu_per_step for b in bs) for v, bs in blocks.items()}
    fed = bench.runtimes["fedlora"]
    lora = bench.settings.lora
    result: dict[str, Any] = {
        "model": bench.settings.model.model, "task": bench.settings.model.task,
        "dataset": bench.settings.data.dataset, "partition": f"{PARTITION} of {NUM_PARTITIONS}",
        "examples": len(bench.data), "batch_size": bench.settings.train.batch_size,
        "max_length": bench.settings.data.max_length, "lora_rank": lora.lora_rank,
        "lora_alpha": lora.lora_alpha, "target_modules": TARGET_MODULES,
        "learning_rate": bench.settings.train.learning_rate, "device": str(fed.device),
        "autocast": str(fed.autocast), "torch_threads": torch.get_num_threads(),
        "steps_per_block": steps, "repeats": repeats, "warmup_steps": max(1, warmup),
        "variants": bench.variants,
        "plain_step_s": med["plain"], "fedlora_step_s": med["fedlora"],
        "llm_step_overhead": med["fedlora"] / med["plain"],
        "plain_step_cpu_s": cpu["plain"], "fedlora_step_cpu_s": cpu["fedlora"],
        "llm_step_overhead_cpu": cpu["fedlora"] / cpu["plain"],
        "fedlora_inner_step_s": statistics.median(
            b.inner_seconds / b.steps for b in blocks["fedlora"] if b.inner_seconds),
        "lora_init_identical": bench.lora_init_identical,
        "base_weights_identical": bench.base_weights_identical,
        **measured["checks"],
        "block_step_s": {v: [b.per_step for b in bs] for v, bs in blocks.items()},
        "block_step_cpu_s": {v: [b.cpu_per_step for b in bs] for v, bs in blocks.items()},
        "block_first_loss": {v: [b.losses[0] for b in bs] for v, bs in blocks.items()},
    }
    result["block_first_loss_max_abs_diff"] = max(
        (abs(a - b) for a, b in zip(result["block_first_loss"]["fedlora"],
                                    result["block_first_loss"]["plain"], strict=True)),
        default=None)
    if "fedlora_gc" in med:
        result.update(gc_step_s=med["fedlora_gc"],
                      gc_vs_fedlora=med["fedlora_gc"] / med["fedlora"],
                      gc_vs_plain=med["fedlora_gc"] / med["plain"],
                      gc_step_cpu_s=cpu["fedlora_gc"])
    return result


# --- memory, one process per variant -----------------------------------------------------

def rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` (``ru_maxrss`` keeps the forking parent's across exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class RssSampler:
    """The largest RSS seen while it runs (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, rss_mb() or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb() or 0.0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb() or 0.0)


def memory_child(variant: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Build only ``variant`` in this fresh process and train it ``memory_steps`` steps."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    config = run_config(spec["model"], batch_size=spec["batch_size"],
                        max_length=spec["max_length"],
                        gradient_checkpointing=variant == "fedlora_gc")
    settings = task_settings(config)
    steps = spec["memory_steps"]
    if variant == "plain":  # reads the token ids the parent wrote: no data library here
        from task.model import autocast_dtype, select_device

        device = select_device(settings.model.device)
        plain = PlainLoop.build(spec["folder"], settings, device,
                                autocast_dtype(settings.model.precision, device))
        built = rss_mb()
        with RssSampler() as sampler:
            plain.train(spec["rows"][:steps], settings.train.learning_rate)
    else:
        runtime = TaskRuntime.build(settings)
        data = runtime.encoded_partition(PARTITION, NUM_PARTITIONS)
        train = dataclasses.replace(settings.train, local_steps=steps)
        built = rss_mb()
        with RssSampler() as sampler:
            train_local(runtime.model, runtime.tokenizer, data, train, device=runtime.device,
                        autocast=runtime.autocast, seed=spec["seed"])
    out: dict[str, Any] = {"peak_rss_mb": peak_rss_mb(), "rss_after_build_mb": built,
                           "peak_rss_during_steps_mb": sampler.peak, "steps": steps}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_memory(bench: Bench, *, steps: int, threads: int, workdir: Path, repeats: int = 1,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """Peak memory of each variant, each run in its own process; medians over ``repeats``.

    glibc's allocator makes the peak vary from run to run (SmolLM2, the same 2 steps:
    3832, 3836 and 4209 MB), hence the repeats.
    """
    plan = batch_plan(len(bench.data), bench.settings.train.batch_size, seed, steps)
    spec = {"model": bench.settings.model.model, "batch_size": bench.settings.train.batch_size,
            "max_length": bench.settings.data.max_length, "memory_steps": steps,
            "threads": threads, "seed": seed, "rows": plan_rows(bench.data, plan),
            "folder": plain_model_folder(bench.settings, workdir)}
    spec_path = workdir / "memory-spec.json"
    spec_path.write_text(json.dumps(spec))
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in bench.variants}
    for r in range(repeats):
        for variant in bench.variants:
            out_path = workdir / f"memory-{variant}-{r}.json"
            print(f"--- memory: {variant} in its own process ({r + 1}/{repeats}) ---",
                  file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                                   "--child-memory", variant, "--spec", str(spec_path),
                                   "--out", str(out_path)], stdout=sys.stderr, check=False)
            if proc.returncode != 0 or not out_path.exists():
                raise SystemExit(f"the memory run of {variant} failed (exit {proc.returncode})")
            runs[variant].append(json.loads(out_path.read_text()))
    results: dict[str, dict[str, Any]] = {}
    for variant, outs in runs.items():
        results[variant] = {key: statistics.median(o[key] for o in outs) for key in outs[0]
                            if isinstance(outs[0][key], float)}
        results[variant].update(steps=steps, runs=len(outs),
                                peak_rss_mb_runs=[o["peak_rss_mb"] for o in outs])
    return results


# --- output ------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(result: dict[str, Any]) -> None:
    targets = ",".join(result["target_modules"])
    print(f"{result['model']} + LoRA r={result['lora_rank']} ({targets}),"
          f" {result['task']} on {result['dataset']} (client {result['partition']}: "
          f"{result['examples']} examples), batch {result['batch_size']}, max-length "
          f"{result['max_length']}, {result['device']}, autocast {result['autocast']}, "
          f"{result['torch_threads']} torch threads")
    print(f"per-step wall time: median of {result['repeats']} blocks of "
          f"{result['steps_per_block']} steps each, after {result['warmup_steps']} warm-up "
          "steps; blocks alternate, same batches and start adapter for every variant")
    memory = result.get("memory") or {}
    print(f"{'variant':34} {'median ms/step':>14} {'min':>9} {'max':>9} {'CPU ms/step':>12} "
          f"{'peak RSS MB':>12} {'after build':>12} {'during steps':>13}")
    for v in result["variants"]:
        times = result["block_step_s"][v]
        mem = memory.get(v, {})
        print(f"{LABELS[v]:34} {statistics.median(times) * 1e3:14.1f} "
              f"{min(times) * 1e3:9.1f} {max(times) * 1e3:9.1f} "
              f"{statistics.median(result['block_step_cpu_s'][v]) * 1e3:12.1f} "
              f"{fmt(mem.get('peak_rss_mb')):>12} {fmt(mem.get('rss_after_build_mb')):>12} "
              f"{fmt(mem.get('peak_rss_during_steps_mb')):>13}")
    print(f"llm_step_overhead = fedlora / plain = {result['llm_step_overhead']:.3f}x "
          f"(target <= 1.05; in CPU time {result['llm_step_overhead_cpu']:.3f}x; fedlora's own "
          f"train-seconds give {result['fedlora_inner_step_s'] / result['plain_step_s']:.3f}x)")
    if "gc_step_s" in result:
        peaks = "" if not memory else (
            f"; peak RSS {memory['fedlora_gc']['peak_rss_mb']:.0f} MB against "
            f"{memory['fedlora']['peak_rss_mb']:.0f} MB without")
        print(f"gradient checkpointing: {result['gc_vs_fedlora']:.3f}x fedlora's step, "
              f"{result['gc_vs_plain']:.3f}x the plain step{peaks}")
    if memory:
        runs = "; ".join(f"{v} " + ", ".join(f"{x:.0f}" for x in m["peak_rss_mb_runs"])
                         for v, m in memory.items())
        print(f"peak RSS: median of {next(iter(memory.values()))['runs']} processes per variant, "
              f"{next(iter(memory.values()))['steps']} steps each (MB: {runs})")
    block_diff = result["block_first_loss_max_abs_diff"]
    gc_loss = result.get("first_step_loss_fedlora_gc")
    print(f"first step loss: fedlora {result['first_step_loss_fedlora']:.6f}, plain "
          f"{result['first_step_loss_plain']:.6f} "
          f"(|diff| {result['first_step_loss_abs_diff']:.2e})"
          + ("" if gc_loss is None else f", fedlora with checkpointing {gc_loss:.6f}")
          + ("" if block_diff is None else
             f"; first loss of every timed block: max |diff| {block_diff:.2e}"))
    print(f"same batches: {'yes' if result['same_batches'] else 'NO'} "
          f"(shapes {result['batch_shapes']}); LoRA init from the same seed identical: "
          f"{'yes' if result['lora_init_identical'] else 'no (copied from fedlora)'}; "
          f"base weights identical: {'yes' if result['base_weights_identical'] else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (tiny-llama for a quick check of the wiring)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=int, default=4, help="timed blocks per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads: 1 (default) as a simulated client trains "
                             "(Ray: one CPU, OMP_NUM_THREADS=1); 0: torch's default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="also time fedlora with gradient checkpointing")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps of each variant's own memory process")
    parser.add_argument("--memory-repeats", type=int, default=3,
                        help="processes per variant for the memory figures (medians)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--child-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        args.out.write_text(json.dumps(memory_child(args.child_memory,
                                                    json.loads(args.spec.read_text()))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="llm-step-") as tmp:
        bench = build(args.model, batch_size=args.batch_size, max_length=args.max_length,
                      gradient_checkpointing=args.gradient_checkpointing, workdir=Path(tmp))
        measured = measure(bench, steps=args.steps, repeats=args.repeats, warmup=args.warmup)
        result = summarise(bench, measured, steps=args.steps, repeats=args.repeats,
                           warmup=args.warmup)
        if not args.no_memory:
            result["memory"] = measure_memory(bench, steps=args.memory_steps,
                                              threads=args.threads, workdir=Path(tmp),
                                              repeats=args.memory_repeats)
            result["peak_rss_mb"] = {v: m["peak_rss_mb"] for v, m in result["memory"].items()}
    print_report(result)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
