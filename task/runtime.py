"""A built task: base model with its LoRA adapter, tokenizer, data, device.

Building one is the expensive part of a client round (loading weights, reading and
tokenizing data), so processes keep it: see :func:`cached_runtime`. Everything that
varies per round (the adapter, the optimizer, the data order) is reset from the
message, so a cached runtime gives exactly the update a fresh one would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from strategies.adapter import LoraAdapter
from strategies.parts import BASE
from task.adapters import DEFAULT_ADAPTER, get_adapter, set_adapter, set_trainable_parts
from task.base_deltas import BaseDeltas, split_base
from task.data import TEXT_COLUMN, TaskData, load_partition, load_task_data, make_partitioner
from task.model import (
    attach_lora,
    autocast_dtype,
    enable_checkpointing,
    load_base_model,
    load_tokenizer,
    lora_config,
    select_device,
)
from task.settings import TaskSettings
from task.tasks import Task, get_task
from task.training import Encoded

if TYPE_CHECKING:
    from peft import PeftModel

    from task.canaries import Canaries


@dataclass
class TaskRuntime:
    """Model, tokenizer and data for one task configuration, built once per process."""

    settings: TaskSettings
    task: Task
    model: PeftModel
    tokenizer: Any
    data: TaskData
    device: torch.device
    autocast: torch.dtype | None
    _initial: dict[str, LoraAdapter]
    active: str = DEFAULT_ADAPTER
    _encoded: dict[Any, Any] = field(default_factory=dict)
    _base: BaseDeltas | None = None

    @property
    def base(self) -> BaseDeltas:
        """Deltas on the base weights (sparse masks seeded by the run seed)."""
        if self._base is None:
            self._base = BaseDeltas(self.model, self.settings.train.seed)
        return self._base

    @classmethod
    def build(cls, settings: TaskSettings) -> TaskRuntime:
        """Load data and model and attach a fresh adapter, all seeded by the run seed."""
        task = get_task(settings.model.task)
        data = load_task_data(settings.data, task)
        seed = settings.train.seed
        base = load_base_model(settings.model, task, num_labels=data.num_labels, seed=seed)
        if settings.model.gradient_checkpointing:
            enable_checkpointing(base)
        model = attach_lora(base, settings.lora, task, seed=seed)
        device = select_device(settings.model.device)
        model.to(device)
        return cls(
            settings=settings,
            task=task,
            model=model,
            tokenizer=load_tokenizer(settings.model),
            data=data,
            device=device,
            autocast=autocast_dtype(settings.model.precision, device),
            _initial={DEFAULT_ADAPTER: get_adapter(model, settings.lora.lora_alpha)},
        )

    @property
    def initial_adapter(self) -> LoraAdapter:
        """The freshly initialised default adapter (rank and alpha of the run settings)."""
        return self._initial[DEFAULT_ADAPTER]

    def activate(self, rank: int | None = None, alpha: float | None = None) -> str:
        """Make the adapter of this rank and alpha the active one, creating it on first use.

        Adapters other than the default are initialised from a seed derived from the run
        seed and the rank, so every process (clients and server) builds the same one.
        """
        lora = self.settings.lora
        rank = lora.lora_rank if rank is None else rank
        alpha = lora.lora_alpha if alpha is None else alpha
        if (rank, alpha) == (lora.lora_rank, lora.lora_alpha):
            name = DEFAULT_ADAPTER
        else:
            name = f"r{rank}-a{alpha:g}"
        if name not in self.model.peft_config:
            config = lora_config(lora, self.task, self.model.get_base_model(), rank=rank,
                                 alpha=alpha)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.settings.train.seed * 7919 + rank)
                self.model.add_adapter(name, config)
            self.model.to(self.device)
        self.model.set_adapter(name)
        self.active = name
        if name not in self._initial:
            self._initial[name] = get_adapter(self.model, alpha, name)
        return name

    @property
    def alpha(self) -> float:
        """The alpha of the active adapter."""
        return float(self.model.peft_config[self.active].lora_alpha)

    def initial(self) -> LoraAdapter:
        """The freshly initialised state of the active adapter."""
        return self._initial[self.active]

    def get_adapter(self) -> LoraAdapter:
        """The active adapter's current state (with the base deltas, if any are applied)."""
        adapter = get_adapter(self.model, self.alpha, self.active)
        if self.base.modified:
            adapter.extras.update(self.base.extract())
        return adapter

    def set_adapter(self, adapter: LoraAdapter) -> None:
        """Replace every parameter of the active adapter.

        Base-weight deltas in the state (sparse or dense) are applied to the base
        weights; without them, the base weights are (back) at their originals.
        """
        state, deltas = split_base(adapter.to_state_dict())
        if deltas or self.base.modified:
            self.base.apply(deltas)
        set_adapter(self.model, LoraAdapter.from_state_dict(state, adapter.alpha), self.active)

    def base_weights(self) -> dict[str, np.ndarray]:
        """The pretrained weights of the LoRA-adapted modules (``out x in``), by module name.

        Without any delta a strategy applied (a cached runtime may still carry the last
        run's).
        """
        return self.base.pretrained()

    def set_trainable(self, parts: Iterable[str]) -> None:
        """Train only these parts of the active adapter.

        With the ``base`` part, the entries of the base weights that carry a sparse delta
        are trained too (SLoRA's first stage); dense deltas are never trained.
        """
        parts = frozenset(parts)
        set_trainable_parts(self.model, parts - {BASE}, self.active)
        if BASE in parts:
            self.base.start_training()
        else:
            self.base.stop_training()

    def encoded_partition(self, partition_id: int, num_partitions: int) -> Encoded:
        """Client ``partition_id``'s tokenized training share (cached).

        With ``local-test-fraction`` above 0, that share of the partition is held back
        for :meth:`encoded_local_test`.
        """
        return self._client_split(partition_id, num_partitions)[0]

    def encoded_local_test(self, partition_id: int, num_partitions: int) -> Encoded:
        """The client's own held-out share (empty without ``local-test-fraction``)."""
        return self._client_split(partition_id, num_partitions)[1]

    def _client_split(self, partition_id: int, num_partitions: int) -> tuple[Encoded, Encoded]:
        key = ("partition", partition_id, num_partitions)
        if key not in self._encoded:
            part = load_partition(self.data.train, self.settings.data,
                                  partition_id=partition_id, num_partitions=num_partitions,
                                  partitioner=self._partitioner(num_partitions), task=self.task)
            if self.settings.data.audit_canaries > 0:
                from task.canaries import insert_canaries

                canaries, included = self.audit_canaries()
                mine = np.arange(len(canaries)) % num_partitions == partition_id
                part = insert_canaries(part, canaries.subset(included & mine))
            fraction = self.settings.data.local_test_fraction
            if fraction > 0 and len(part) >= 2:
                split = part.train_test_split(test_size=fraction, seed=self.settings.data.seed)
                self._encoded[key] = (self.encode(split["train"]), self.encode(split["test"]))
            else:
                encoded = self.encode(part)
                self._encoded[key] = (encoded, encoded.empty())
        return self._encoded[key]

    def _partitioner(self, num_partitions: int) -> object:
        """The train pool's partitioner into ``num_partitions`` (cached: it indexes them all)."""
        key = ("partitioner", num_partitions)
        if key not in self._encoded:
            self._encoded[key] = make_partitioner(self.settings.data, num_partitions,
                                                  self.data.train, self.task)
        return self._encoded[key]

    def audit_canaries(self) -> tuple[Canaries, np.ndarray]:
        """The run's audit canaries and the mask of those put into training.

        The same on every client and on the server: both derive from the data seed.

        Raises:
            ValueError: the task is not classification (canaries carry labels).

        """
        from task.canaries import make_canaries, split_canaries

        if "canaries" not in self._encoded:
            if not self.task.has_labels:
                raise ValueError(f"audit-canaries needs a task with labels (canaries are "
                                 f"randomly labelled examples), not '{self.task.name}'; set "
                                 "audit-canaries=0")
            canaries = make_canaries(self.data.train[TEXT_COLUMN], self.data.num_labels,
                                     self.settings.data.audit_canaries,
                                     seed=self.settings.data.seed)
            self._encoded["canaries"] = (canaries, split_canaries(
                canaries, seed=self.settings.data.seed)[1])
        return self._encoded["canaries"]

    def encoded_test(self) -> Encoded:
        """The tokenized held-out split (cached)."""
        if "test" not in self._encoded:
            self._encoded["test"] = self.encode(self.data.test)
        return self._encoded["test"]

    def encode(self, ds: Any) -> Encoded:
        """Tokenize a prepared dataset with this runtime's task, tokenizer and settings."""
        return self.task.encode(ds, self.tokenizer, self.settings.data.max_length)


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
