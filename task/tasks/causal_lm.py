"""Causal language modelling on plain text: next-token loss, scored by perplexity."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from task.encoded import Encoded
from task.tasks.base import Evaluation, Task, autocast, eval_batches, require_columns
from task.tasks.classification import TEXT_COLUMN, rename_columns, tokenize_texts
from task.tasks.registry import register

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from task.settings import DataSettings, GenerationSettings

IGNORE = -100  # the label value transformers' losses skip


def pad_causal(data: Encoded, indices: Sequence[int], tokenizer: PreTrainedTokenizerBase,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids with ``labels`` = the ids, except padding and prompt tokens (-100).

    An example's first ``prompt_lengths[i]`` tokens are masked when the data has prompt
    lengths (instruction tuning), so the loss covers response tokens only.
    """
    import torch

    rows = [data.input_ids[i] for i in indices]
    width = max((len(r) for r in rows), default=0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, (index, ids) in enumerate(zip(indices, rows, strict=True)):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, :len(ids)] = 1
        start = 0 if data.prompt_lengths is None else data.prompt_lengths[index]
        labels[row, start:len(ids)] = input_ids[row, start:len(ids)]
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def token_losses(model: torch.nn.Module,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses ``[batch, positions]`` and the mask of the tokens that count.

    Only the positions that predict a counted token in some example of the batch get
    logits (``logits_to_keep``): with a response-only loss that is a fraction of the
    sequence, and the vocabulary projection (49,152 words for SmolLM2) is the largest
    single cost of a step. Losses and gradients are those of the full computation; a
    model without ``logits_to_keep`` computes every position.
    """
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _keeps_logits(type(base)):
        positions = (targets != IGNORE).any(0).nonzero().squeeze(1)  # logit t predicts t+1
        logits = model(**inputs, logits_to_keep=positions).logits.float()
        targets = targets[:, positions]
    else:
        logits = model(**inputs).logits.float()[:, :-1]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE, reduction="none").view_as(targets)
    return losses, (targets != IGNORE).to(losses.dtype)


def mean_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token loss over every counted token of the batch (transformers' loss)."""
    losses, mask = token_losses(model, batch)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def example_mean_losses(model: torch.nn.Module,
                        batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean loss over its own counted tokens (0 for an example with none)."""
    losses, mask = token_losses(model, batch)
    return (losses * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def perplexity_scores(task: Task, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                      data: Encoded, *, batch_size: int, device: torch.device,
                      dtype: torch.dtype | None) -> dict[str, float]:
    """Mean next-token loss over every counted token of ``data``, and its perplexity."""
    import torch

    total, count = 0.0, 0.0
    with torch.inference_mode():
        for _, batch in eval_batches(task, model, tokenizer, data, batch_size, device):
            with autocast(device, dtype):
                losses, mask = token_losses(model, batch)
            total += float((losses * mask).sum())
            count += float(mask.sum())
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class CausalLM(Task):
    """Plain text (``text-column``): next-token loss over every token; perplexity."""

    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    metric = "perplexity"

    def required_columns(self, settings: DataSettings) -> list[str]:
        """The text column."""
        return [settings.text_column]

    def prepare(self, ds: Dataset, settings: DataSettings) -> Dataset:
        """Rename the text column to ``text``; records without text are left out."""
        require_columns(ds, self.required_columns(settings), "set text-column")
        ds = rename_columns(ds, {settings.text_column: TEXT_COLUMN})
        keep = [i for i, t in enumerate(ds[TEXT_COLUMN]) if isinstance(t, str) and t.strip()]
        if not keep:
            raise ValueError(f"no record has text in column '{settings.text_column}'; "
                             "set text-column to the column that holds the text")
        return ds.select(keep) if len(keep) < len(ds) else ds

    def encode(self, ds: Dataset, tokenizer: PreTrainedTokenizerBase,
               max_length: int) -> Encoded:
        """Token ids of the texts, truncated to ``max-length``."""
        ids = tokenize_texts(list(ds[TEXT_COLUMN]), tokenizer, max_length)
        return Encoded(input_ids=ids, task=self.name)

    def collate(self, data: Encoded, indices: Sequence[int], tokenizer: PreTrainedTokenizerBase,
                device: torch.device) -> dict[str, torch.Tensor]:
        """Right-padded ids; ``labels`` are the ids with padding masked."""
        return pad_causal(data, indices, tokenizer, device)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean next-token loss over the batch's counted tokens."""
        return mean_token_loss(model, batch)

    def example_losses(self, model: torch.nn.Module,
                       batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each example's mean next-token loss."""
        return example_mean_losses(model, batch)

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 data: Encoded, *, batch_size: int, device: torch.device,
                 autocast: torch.dtype | None = None,
                 generation: GenerationSettings | None = None) -> Evaluation:
        """Token-mean loss and perplexity."""
        return Evaluation(perplexity_scores(self, model, tokenizer, data, batch_size=batch_size,
                                            device=device, dtype=autocast))


register(CausalLM())
