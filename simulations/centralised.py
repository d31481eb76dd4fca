"""Centralised LoRA fine-tuning on the pooled training data: the federations' reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from task.run_settings import RunSettings


def train_centralised(run_config: Mapping[str, Any], *, steps: int) -> dict[str, Any]:
    """Train one adapter on the whole train pool for ``steps`` steps; score the held-out split.

    Uses the same model, split, LoRA and optimizer settings as a federated run with the
    same run config, so the two are directly comparable.
    """
    import torch

    from task.runtime import TaskRuntime
    from task.training import evaluate, train_local

    settings = RunSettings.from_run_config(run_config)
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    runtime = TaskRuntime.build(settings.task)
    train_settings = dataclasses.replace(settings.task.train, local_steps=steps, local_epochs=0)
    data = runtime.encode(runtime.data.train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.task.train.seed)
        result = train_local(runtime.model, runtime.tokenizer, data, train_settings,
                             device=runtime.device, autocast=runtime.autocast,
                             seed=settings.task.train.seed)
    scores = evaluate(runtime.model, runtime.tokenizer, runtime.encoded_test(),
                      batch_size=settings.federation.eval_batch(runtime.device),
                      device=runtime.device, autocast=runtime.autocast)
    return {"steps": steps, "train_examples": len(data), "train_seconds": result.seconds,
            **{f"eval_{k}": v for k, v in scores.items()}}
