"""The interface every task implements."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from task.encoded import Encoded

#: what loading data reports (records left out, replaced bytes): Flower's logger, so it
#: prints like every other line; a simulated node silences it (the server loaded the same
#: data and said it once), see :data:`DATA_WARNINGS_KEY`
DATA_LOG = logging.getLogger("flwr.data")
#: node-config key: false on a simulated node, so the data's warnings print once
DATA_WARNINGS_KEY = "data-warnings"

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from task.settings import DataSettings, GenerationSettings


@dataclass
class Evaluation:
    """Scores of a model on held-out data, and examples of what it generated (if it did)."""

    scores: dict[str, float]
    samples: list[dict[str, str]] = field(default_factory=list)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on the device, or nothing when ``dtype`` is None."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Task:
    """What the model learns and how it is scored.

    Subclasses set the class attributes and implement :meth:`prepare`, :meth:`encode`,
    :meth:`collate`, :meth:`example_losses` and :meth:`evaluate`.
    """

    #: the ``task`` run-config value
    name: ClassVar[str]
    #: the peft ``TaskType`` member that wraps the model
    peft_task_type: ClassVar[str]
    #: whether examples carry a class (sizes the model's head, enables stratified splits)
    has_labels: ClassVar[bool] = False
    #: the score that ranks rounds (a key of :attr:`Evaluation.scores`)
    metric: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False

    def auto_model(self) -> Any:
        """The transformers ``AutoModel...`` class that loads a base model for this task."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def required_columns(self, settings: DataSettings) -> list[str]:
        """The dataset columns this task reads, under their configured names."""
        raise NotImplementedError

    def prepare(self, ds: Dataset, settings: DataSettings) -> Dataset:
        """Check the columns and records and bring them into this task's canonical form.

        Raises:
            ValueError: a column is missing or a record is unusable; the message names the
                record, the column and the fix.

        """
        raise NotImplementedError

    def label_names(self, ds: Dataset) -> list[str]:
        """The class names of prepared data (empty for tasks without labels)."""
        return []

    def default_partitioner(self) -> str:
        """The partitioner that ``partitioner=auto`` picks for this task."""
        return "dirichlet" if self.has_labels else "iid"

    def encode(self, ds: Dataset, tokenizer: PreTrainedTokenizerBase,
               max_length: int) -> Encoded:
        """Tokenize prepared data once (batches are padded later, by :meth:`collate`)."""
        raise NotImplementedError

    def collate(self, data: Encoded, indices: Sequence[int], tokenizer: PreTrainedTokenizerBase,
                device: torch.device) -> dict[str, torch.Tensor]:
        """Pad the selected examples into model inputs, with ``labels`` for the loss."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch, as the model computes it."""
        return model(**batch).loss

    def example_losses(self, model: torch.nn.Module,
                       batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each example's own loss, shape ``[batch]`` (DP-SGD clips per example)."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 data: Encoded, *, batch_size: int, device: torch.device,
                 autocast: torch.dtype | None = None,
                 generation: GenerationSettings | None = None) -> Evaluation:
        """Score the model on ``data``."""
        raise NotImplementedError


def eval_batches(task: Task, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 data: Encoded, batch_size: int, device: torch.device,
                 ) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """The model in eval mode, then the data in order, as (indices, padded batch)."""
    model.eval()
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        yield indices, task.collate(data, indices, tokenizer, device)


def require_columns(ds: Dataset, needed: Sequence[str], hint: str) -> None:
    """Raise a ``ValueError`` naming the missing columns, the present ones and ``hint``."""
    missing = [c for c in dict.fromkeys(needed) if c and c not in ds.column_names]
    if missing:
        raise ValueError(f"column(s) {missing} not in the dataset; its columns are "
                         f"{ds.column_names} ({hint})")
