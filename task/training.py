"""Local training and evaluation loops for sequence classification and causal LM."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from task.encoded import Encoded
from task.settings import TrainSettings
from task.tasks import get_task
from task.tasks.base import autocast as _autocast

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from task.settings import GenerationSettings
    from task.tasks.base import Evaluation, Task

__all__ = ["Encoded", "TrainResult", "encode", "evaluate", "make_batch", "train_local"]


def encode(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
           task: str | Task) -> Encoded:
    """Tokenize prepared data with ``task``'s encoding (truncated to ``max_length``)."""
    from task.tasks.registry import as_task

    return as_task(task).encode(ds, tokenizer, max_length)


def make_batch(
    encoded: Encoded, indices: list[int], tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Pad the selected examples into model inputs with labels (the data's task collates)."""
    return get_task(encoded.task).collate(encoded, indices, tokenizer, device)


def sample_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled mini-batches over ``n`` examples, epoch after epoch."""
    import torch

    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


@dataclass
class TrainResult:
    """What one local training run did."""

    steps: int
    num_examples: int
    loss_first: float
    loss_mean: float
    loss_last: float
    seconds: float


def train_local(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Encoded,
    settings: TrainSettings,
    *,
    device: torch.device,
    autocast: torch.dtype | None = None,
    seed: int = 0,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Train the model's trainable parameters with AdamW for the configured steps or epochs.

    One step is one optimizer update over ``grad_accumulation`` mini-batches. ``penalty``,
    when given, is added to the loss of every step (a regulariser on the parameters).
    """
    import torch

    if len(data) == 0:
        raise ValueError("cannot train on an empty partition")
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    per_epoch = math.ceil(len(data) / (settings.batch_size * settings.grad_accumulation))
    steps = settings.local_steps or settings.local_epochs * per_epoch
    batches = sample_batches(len(data), settings.batch_size, generator)
    task = get_task(data.task)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(settings.grad_accumulation):
            batch = make_batch(data, next(batches), tokenizer, device)
            with _autocast(device, autocast):
                loss = task.loss(model, batch) / settings.grad_accumulation
            if penalty is not None:
                loss = loss + penalty() / settings.grad_accumulation
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        losses.append(step_loss)
    return TrainResult(
        steps=steps, num_examples=len(data), loss_first=losses[0],
        loss_mean=sum(losses) / len(losses), loss_last=losses[-1],
        seconds=time.perf_counter() - start,
    )


def auto_eval_batch_size(device: torch.device) -> int:
    """The default evaluation batch size: 16 on CPU, 64 on an accelerator.

    On CPU, inference is compute bound and larger batches only spill the activations out
    of cache: MiniLM on 128-token examples, 2 cores, ran 20% faster at 16 than at 64
    (and no faster at 8).
    """
    return 16 if device.type == "cpu" else 64


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Encoded,
    *,
    batch_size: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """The scores of the data's task without generation (loss, accuracy or perplexity)."""
    return evaluate_task(model, tokenizer, data, batch_size=batch_size, device=device,
                         autocast=autocast).scores


def evaluate_task(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: Encoded, *,
    batch_size: int, device: torch.device, autocast: torch.dtype | None = None,
    generation: GenerationSettings | None = None,
) -> Evaluation:
    """The data's task scores the model (with generated answers where it generates)."""
    return get_task(data.task).evaluate(model, tokenizer, data, batch_size=batch_size,
                                        device=device, autocast=autocast,
                                        generation=generation)


def per_example_losses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Encoded,
    *,
    batch_size: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """Each example's own loss (its task's :meth:`~task.tasks.base.Task.example_losses`).

    What a loss-threshold membership-inference attack scores.
    """
    import torch

    from task.tasks.base import eval_batches

    task = get_task(data.task)
    losses: list[np.ndarray] = []
    with torch.inference_mode():
        for _, batch in eval_batches(task, model, tokenizer, data, batch_size, device):
            with _autocast(device, autocast):
                loss = task.example_losses(model, batch)
            losses.append(loss.float().cpu().numpy().astype(np.float64))
    return np.concatenate(losses) if losses else np.zeros(0)
