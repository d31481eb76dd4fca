"""Sequence classification: one label per text, scored by accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from task.encoded import Encoded
from task.tasks.base import (
    DATA_LOG,
    Evaluation,
    Task,
    autocast,
    eval_batches,
    require_columns,
)
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
        """Rename the columns to ``text``/``label``, leave out unusable records, encode labels.

        Texts and labels are text: numbers become their digits, and a label ``NA`` is
        the class ``NA`` (files are read as text, :func:`task.data.read_delimited`).
        Records with an empty or missing text or label are left out, with a warning that
        counts each kind; when none is left the error names the column.
        """
        from datasets import Value

        require_columns(ds, self.required_columns(settings),
                        "set text-column and label-column")
        ds = rename_columns(ds, {settings.text_column: TEXT_COLUMN,
                                 settings.label_column: LABEL_COLUMN})
        if ds.features[TEXT_COLUMN] != Value("string"):
            ds = ds.cast_column(TEXT_COLUMN, Value("string"))
        ds = drop_empty(ds, TEXT_COLUMN, settings.text_column, "text")
        if type(ds.features[LABEL_COLUMN]).__name__ != "ClassLabel":
            if ds.features[LABEL_COLUMN] != Value("string"):
                ds = ds.cast_column(LABEL_COLUMN, Value("string"))
            ds = drop_empty(ds, LABEL_COLUMN, settings.label_column, "label")
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


def drop_empty(ds: Dataset, column: str, name: str, what: str) -> Dataset:
    """Leave out records whose ``column`` is missing or blank, saying how many.

    Filtered in batches on the Arrow table (a large file is not loaded into memory).

    Raises:
        ValueError: no record has a ``what`` in column ``name``.

    """
    import pyarrow.compute as pc

    def has_value(batch: Any) -> Any:  # a pyarrow table: compared in Arrow, not in Python
        values = batch.column(column)
        return pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0),
                            False)

    before = len(ds)
    kept = ds.with_format("arrow").filter(has_value, batched=True,
                                          batch_size=100_000).with_format(None)
    if len(kept) == 0 and before > 0:
        raise ValueError(f"no record has a {what} in column '{name}' (all {before} are empty); "
                         f"set {what}-column to the column that holds the {what}s")
    if len(kept) < before:
        DATA_LOG.warning("%d of %d records have no %s in column '%s' and are left out",
            before - len(kept), before, what, name)
    return kept


register(Classification())
