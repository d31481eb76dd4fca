"""What a strategy does on the client: hooks around local training, registered with it.

A strategy that changes local training (a penalty, a rank cut, training the base
weights) says so in a :class:`ClientHooks` subclass set as its ``client_hooks``; the
generic ClientApp calls the hooks of the strategy named in the round's instructions and
knows nothing of any strategy. The default hooks do nothing.

A hook sees the client's model through :class:`LocalModel` (``task.runtime.TaskRuntime``
provides it) and reads its strategy's settings from the instructions' options, which the
server's strategy fills from the same config class (one default, one parser).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from strategies.adapter import LoraAdapter
from strategies.instructions import ClientInstructions

if TYPE_CHECKING:
    import torch

Penalty = Callable[[], "torch.Tensor"]


class BaseWeights(Protocol):
    """Deltas on the base weights under LoRA (``task.base_deltas.BaseDeltas``)."""

    def start_training(self) -> None:
        """Train the entries of the base weights that carry a sparse delta."""


class LocalModel(Protocol):
    """The client's model as hooks see it."""

    #: the PEFT model (``peft.PeftModel``)
    model: Any
    #: the name of the active adapter
    active: str

    @property
    def base(self) -> BaseWeights:
        """The deltas applied to the base weights."""


class ClientHooks:
    """Client-side behaviour of a strategy; every hook defaults to doing nothing."""

    def before_training(self, local: LocalModel, instructions: ClientInstructions) -> None:
        """Called after the adapter is loaded and the trained parts are set, before training."""

    def penalty(self, local: LocalModel, instructions: ClientInstructions) -> Penalty | None:
        """A term added to the training loss at every step (None: none)."""
        return None

    def after_training(self, adapter: LoraAdapter,
                       instructions: ClientInstructions) -> LoraAdapter:
        """The adapter the client keeps and sends (default: the one it trained)."""
        return adapter


#: the hooks of strategies that change nothing on the client
NO_HOOKS = ClientHooks()
