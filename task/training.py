"""Local training and evaluation loops for sequence classification and causal LM."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from task.data import LABEL_COLUMN, TEXT_COLUMN
from task.settings import TrainSettings

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


@dataclass
class Encoded:
    """A tokenized dataset: token ids per example, and class labels for classification."""

    input_ids: list[list[int]]
    labels: list[int] | None

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, task: str) -> Encoded:
    """Tokenize once (truncated to ``max_length``), pad later per batch.

    The token ids come from the machine's disk cache when another process already
    tokenized the same texts the same way (:mod:`task.encode_cache`).
    """
    from task import encode_cache

    texts = list(ds[TEXT_COLUMN])
    labels = list(ds[LABEL_COLUMN]) if task == "classification" else None
    fingerprint = encode_cache.tokenizer_fingerprint(tokenizer)
    key = (None if fingerprint is None else
           encode_cache.content_key(texts, tokenizer=fingerprint, max_length=max_length))
    ids = None if key is None else encode_cache.load(key)
    if ids is None or len(ids) != len(texts):
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        if key is not None:
            encode_cache.save(key, ids)
    return Encoded(input_ids=ids, labels=labels)


def make_batch(
    encoded: Encoded, indices: list[int], tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Pad the selected examples into model inputs with labels."""
    import torch

    batch = tokenizer.pad({"input_ids": [encoded.input_ids[i] for i in indices]},
                          return_tensors="pt")
    if encoded.labels is not None:
        batch["labels"] = torch.tensor([encoded.labels[i] for i in indices])
    else:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    return {k: v.to(device) for k, v in batch.items()}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(settings.grad_accumulation):
            batch = make_batch(data, next(batches), tokenizer, device)
            with _autocast(device, autocast):
                loss = model(**batch).loss / settings.grad_accumulation
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


def _eval_batches(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: Encoded,
    batch_size: int, device: torch.device,
) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """The model in eval mode, then the data in order, as (indices, padded batch)."""
    model.eval()
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        yield indices, make_batch(data, indices, tokenizer, device)


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Encoded,
    *,
    batch_size: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss, and accuracy (classification) or perplexity (causal LM)."""
    import torch

    total_loss, total_weight, correct = 0.0, 0, 0
    with torch.inference_mode():
        for indices, batch in _eval_batches(model, tokenizer, data, batch_size, device):
            with _autocast(device, autocast):
                out = model(**batch)
            if data.labels is not None:
                weight = len(indices)
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            else:
                weight = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += float(out.loss) * weight
            total_weight += weight
    loss = total_loss / max(total_weight, 1)
    if data.labels is not None:
        return {"loss": loss, "accuracy": correct / max(len(data), 1)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def per_example_losses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Encoded,
    *,
    batch_size: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """Each example's loss (classification: cross-entropy of its label), in data order.

    What a loss-threshold membership-inference attack scores.

    Raises:
        ValueError: the data has no labels (causal LM).

    """
    import torch

    if data.labels is None:
        raise ValueError("per-example losses need labelled (classification) data")
    losses: list[np.ndarray] = []
    with torch.inference_mode():
        for _, batch in _eval_batches(model, tokenizer, data, batch_size, device):
            labels = batch.pop("labels")
            with _autocast(device, autocast):
                logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
            losses.append(loss.cpu().numpy().astype(np.float64))
    return np.concatenate(losses) if losses else np.zeros(0)
