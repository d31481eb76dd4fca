"""DP-SGD step time vs plain step time, on the embedded default's model.

MiniLM-L6 with LoRA r=8 on query and value and a 5-class head, on BBC News
(``TaskRuntime.build(TaskSettings.from_run_config({}))``); one batch of 16 examples of 128
tokens (the longest of a sample, so no padding), the same batch for both, side by side
in one run, in alternating blocks:

- plain step: forward, backward, AdamW update (a step of ``train_local``);
- DP step: the same through Opacus, as ``train_local_dp`` does it: per-example gradients
  by hooks, per-example clipping, Gaussian noise, accounting, AdamW update.

``dp_overhead`` = median DP step / median plain step, each after a warm-up.

Usage: python bench/dp_overhead.py [--json] [--steps 10] [--warmup 2] [--blocks 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from privacy.accounting import DPSettings
from task.dp_training import dp_data_loader, dp_step, private_training
from task.runtime import TaskRuntime
from task.settings import TaskSettings
from task.training import make_batch

BATCH_SIZE = 16
SAMPLE = 200


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fixed_batch(runtime: TaskRuntime) -> tuple[dict[str, torch.Tensor], object]:
    """The 16 longest of the first examples of the train pool (all at max-length)."""
    data = runtime.encode(runtime.data.train.select(range(SAMPLE)))
    order = sorted(range(len(data)), key=lambda i: -len(data.input_ids[i]))[:BATCH_SIZE]
    return make_batch(data, order, runtime.tokenizer, torch.device("cpu")), data


def timed(step, device: torch.device, count: int) -> list[float]:
    times = []
    for _ in range(count):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def plain_block(runtime: TaskRuntime, batch: dict[str, torch.Tensor], count: int) -> list[float]:
    model, device = runtime.model, runtime.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=runtime.settings.train.learning_rate)
    on_device = {k: v.to(device) for k, v in batch.items()}
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        ctx = (torch.autocast(device.type, dtype=runtime.autocast) if runtime.autocast
               else torch.enable_grad())
        with ctx:
            loss = model(**on_device).loss
        loss.backward()
        optimizer.step()

    return timed(step, device, count)


def dp_block(runtime: TaskRuntime, batch: dict[str, torch.Tensor], data, count: int) -> list[float]:
    model, device = runtime.model, runtime.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=runtime.settings.train.learning_rate)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    loader = dp_data_loader(data, runtime.tokenizer, runtime.settings.train, seed=0)
    with private_training(model, optimizer, loader, dp=dp, noise_multiplier=1.0) as private:
        return timed(lambda: dp_step(model, private.optimizer, batch,
                                     physical_batch_size=BATCH_SIZE, device=device,
                                     autocast=runtime.autocast), device, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks")
    args = parser.parse_args()
    runtime = TaskRuntime.build(TaskSettings.from_run_config({}))
    batch, data = fixed_batch(runtime)
    plain_block(runtime, batch, args.warmup)
    dp_block(runtime, batch, data, args.warmup)
    per_block = max(1, args.steps // args.blocks)
    plain, private = [], []
    for _ in range(args.blocks):
        plain += plain_block(runtime, batch, per_block)
        private += dp_block(runtime, batch, data, per_block)
    plain_s, dp_s = statistics.median(plain), statistics.median(private)
    batch_size, seq_len = batch["input_ids"].shape
    lora = runtime.settings.lora
    result = {
        "model": runtime.settings.model.model, "lora_rank": lora.lora_rank,
        "target_modules": lora.target_modules, "device": str(runtime.device),
        "autocast": str(runtime.autocast), "batch_size": int(batch_size),
        "seq_len": int(seq_len), "steps": len(plain), "warmup": args.warmup,
        "plain_step_s": plain_s, "dp_step_s": dp_s, "dp_overhead": dp_s / plain_s,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"{result['model']} + LoRA r={lora.lora_rank} ({lora.target_modules}), "
          f"batch {batch_size} x {seq_len} tokens, {result['device']}, "
          f"median of {len(plain)} steps each after {args.warmup} warm-up")
    print(f"plain step {plain_s * 1e3:8.1f} ms")
    print(f"DP step    {dp_s * 1e3:8.1f} ms")
    print(f"DP / plain {dp_s / plain_s:8.2f}x")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
