"""A built task: base model with its LoRA adapter, tokenizer, data, device.

Building one is the expensive part of a client round (loading weights, reading and
tokenizing data), so processes keep it: see :func:`cached_runtime`. Everything that
varies per round (the adapter, the optimizer, the data order) is reset from the
message, so a cached runtime gives exactly the update a fresh one would.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strategies.adapter import LoraAdapter
from task.adapters import get_adapter, set_adapter
from task.data import TaskData, load_partition, load_task_data
from task.model import attach_lora, autocast_dtype, load_base_model, load_tokenizer, select_device
from task.settings import TaskSettings
from task.training import Encoded, encode

if TYPE_CHECKING:
    import torch
    from peft import PeftModel


@dataclass
class TaskRuntime:
    """Model, tokenizer and data for one task configuration, built once per process."""

    settings: TaskSettings
    model: PeftModel
    tokenizer: Any
    data: TaskData
    device: torch.device
    autocast: torch.dtype | None
    initial_adapter: LoraAdapter
    _encoded: dict[Any, Encoded] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: TaskSettings) -> TaskRuntime:
        """Load data and model and attach a fresh adapter, all seeded by the run seed."""
        data = load_task_data(settings.data, settings.model.task)
        seed = settings.train.seed
        base = load_base_model(settings.model, num_labels=data.num_labels, seed=seed)
        model = attach_lora(base, settings.lora, settings.model.task, seed=seed)
        device = select_device(settings.model.device)
        model.to(device)
        return cls(
            settings=settings,
            model=model,
            tokenizer=load_tokenizer(settings.model),
            data=data,
            device=device,
            autocast=autocast_dtype(settings.model.precision, device),
            initial_adapter=get_adapter(model, settings.lora.lora_alpha),
        )

    def get_adapter(self) -> LoraAdapter:
        """The model's current adapter."""
        return get_adapter(self.model, self.settings.lora.lora_alpha)

    def set_adapter(self, adapter: LoraAdapter) -> None:
        """Replace every adapter parameter of the model."""
        set_adapter(self.model, adapter)

    def encoded_partition(self, partition_id: int, num_partitions: int) -> Encoded:
        """Client ``partition_id``'s tokenized share of the train pool (cached)."""
        key = ("partition", partition_id, num_partitions)
        if key not in self._encoded:
            part = load_partition(self.data.train, self.settings.data,
                                  partition_id=partition_id, num_partitions=num_partitions)
            self._encoded[key] = self.encode(part)
        return self._encoded[key]

    def encoded_test(self) -> Encoded:
        """The tokenized held-out split (cached)."""
        if "test" not in self._encoded:
            self._encoded["test"] = self.encode(self.data.test)
        return self._encoded["test"]

    def encode(self, ds: Any) -> Encoded:
        """Tokenize a dataset with this runtime's tokenizer and settings."""
        return encode(ds, self.tokenizer, self.settings.data.max_length, self.settings.model.task)


def _runtime_key(settings: TaskSettings) -> tuple[Any, ...]:
    """What determines a built runtime: model, data, LoRA shape and the seed (not training)."""
    return (settings.model, settings.data, settings.lora, settings.train.seed)


_CACHE: dict[tuple[Any, ...], TaskRuntime] = {}
_CACHE_LOCK = threading.Lock()


def cached_runtime(settings: TaskSettings) -> TaskRuntime:
    """The process-wide runtime for these settings, built on first use.

    One runtime is kept per process; asking for another configuration replaces it.
    """
    key = _runtime_key(settings)
    with _CACHE_LOCK:
        runtime = _CACHE.get(key)
        if runtime is None:
            _CACHE.clear()
            runtime = _CACHE[key] = TaskRuntime.build(settings)
        return runtime
