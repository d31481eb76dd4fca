"""Sequence classification: one label per text, scored by accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from task.encoded import Encoded
from task.tasks.base import Evaluation, Task, autocast, eval_batches, require_columns
from task.tasks.registry import register

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from task.settings import DataSettings, GenerationSettings

TEXT_COLUMN, LABEL_COLUMN = "text", "label"


def rename_columns(ds: Dataset, renames: dict[str, str]) -> Dataset:
    """Rename columns ``old -> new``, replacing a column that already has the new name."""
    for old, new in renames.items():
        if old != new:
            if new in ds.column_names:
                ds = ds.remove_columns(new)
            ds = ds.rename_column(old, new)
    return ds


def tokenize_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase,
                   max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length``, via the machine's disk cache."""
    from task import encode_cache

    fingerprint = encode_cache.tokenizer_fingerprint(tokenizer)
    key = (None if fingerprint is None else
           encode_cache.content_key(texts, tokenizer=fingerprint, max_length=max_length))
    ids = None if key is None else encode_cache.load(key)
    if ids is None or len(ids) != len(texts):
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        if key is not None:
            encode_cache.save(key, ids)
    return ids


class Classification(Task):
    """A class per text (``text-column``, ``label-column``); cross-entropy; accuracy."""

    name = "classification"
    peft_task_type = "SEQ_CLS"
    has_labels = True
    metric = "accuracy"
    higher_is_better = True

    def auto_model(self) -> Any:
        """``AutoModelForSequenceClassification`` (a new head, sized by the labels)."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def required_columns(self, settings: DataSettings) -> list[str]:
        """The text and the label column."""
        return [settings.text_column, settings.label_column]

    def prepare(self, ds: Dataset, settings: DataSettings) -> Dataset:
        """Rename the columns to ``text``/``label``, drop records without a label, encode labels.

        Records whose label is missing (None/NaN) are left out, with a warning that counts
        them; a missing text is an error naming the record.
        """
        require_columns(ds, self.required_columns(settings),
                        "set text-column and label-column")
        ds = rename_columns(ds, {settings.text_column: TEXT_COLUMN,
                                 settings.label_column: LABEL_COLUMN})
        texts = ds[TEXT_COLUMN]
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"record {index}: column '{settings.text_column}' is "
                                 f"{text!r}, not text; fix or remove the record")
        if type(ds.features[LABEL_COLUMN]).__name__ != "ClassLabel":
            ds = _drop_missing_labels(ds, settings.label_column)
            ds = ds.class_encode_column(LABEL_COLUMN)
        return ds

    def label_names(self, ds: Dataset) -> list[str]:
        """The ``ClassLabel`` names of the label column."""
        return list(ds.features[LABEL_COLUMN].names)

    def encode(self, ds: Dataset, tokenizer: PreTrainedTokenizerBase,
               max_length: int) -> Encoded:
        """Token ids of the texts (truncated to ``max-length``) and their labels."""
        ids = tokenize_texts(list(ds[TEXT_COLUMN]), tokenizer, max_length)
        return Encoded(input_ids=ids, labels=list(ds[LABEL_COLUMN]), task=self.name)

    def collate(self, data: Encoded, indices: Sequence[int], tokenizer: PreTrainedTokenizerBase,
                device: torch.device) -> dict[str, torch.Tensor]:
        """Padded ids and the class of each example as ``labels``."""
        import torch

        batch = tokenizer.pad({"input_ids": [data.input_ids[i] for i in indices]},
                              return_tensors="pt")
        batch["labels"] = torch.tensor([data.labels[i] for i in indices])  # type: ignore[index]
        return {k: v.to(device) for k, v in batch.items()}

    def example_losses(self, model: torch.nn.Module,
                       batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of each example's label."""
        import torch.nn.functional as F

        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 data: Encoded, *, batch_size: int, device: torch.device,
                 autocast: torch.dtype | None = None,
                 generation: GenerationSettings | None = None) -> Evaluation:
        """Mean cross-entropy and accuracy."""
        import torch

        total_loss, correct = 0.0, 0
        with torch.inference_mode():
            for indices, batch in eval_batches(self, model, tokenizer, data, batch_size, device):
                with _autocast(device, autocast):
                    out = model(**batch)
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                total_loss += float(out.loss) * len(indices)
        count = max(len(data), 1)
        return Evaluation({"loss": total_loss / count, "accuracy": correct / count})


_autocast = autocast


def _drop_missing_labels(ds: Dataset, column: str) -> Dataset:
    """Leave out records whose label is None or NaN, saying how many."""
    import math
    from logging import WARNING

    from flwr.supercore import log

    labels = ds[LABEL_COLUMN]
    keep = [i for i, y in enumerate(labels)
            if y is not None and not (isinstance(y, float) and math.isnan(y))
            and not (isinstance(y, str) and not y.strip())]
    if len(keep) < len(labels):
        if not keep:
            raise ValueError(f"every record's label column '{column}' is empty; "
                             "set label-column to the column that holds the classes")
        log(WARNING, "%d of %d records have no label in column '%s' and are left out",
            len(labels) - len(keep), len(labels), column)
        ds = ds.select(keep)
    return ds


register(Classification())
