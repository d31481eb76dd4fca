"""Messages out: which nodes a round samples, and the message that carries each payload.

A :class:`Payload` is what one node receives: the adapter it starts from, the parts of
it that travel, and its :class:`~strategies.instructions.ClientInstructions`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from strategies.adapter import LoraAdapter
from strategies.codec import ARRAYS_KEY, CONFIG_KEY, record_nbytes, state_to_record
from strategies.config import check
from strategies.instructions import ClientInstructions
from strategies.parts import ALL_PARTS, select_parts

NODE_POLL_INTERVAL = 0.2  # seconds between looks at the connected nodes while waiting


@dataclass(frozen=True)
class Payload:
    """What one node receives: its adapter, the parts of it that travel, its instructions."""

    adapter: LoraAdapter
    instructions: ClientInstructions
    sent_parts: frozenset[str] = ALL_PARTS


def check_sampling(*, fraction_train: float, min_train_nodes: int, fraction_evaluate: float,
                   min_reply_fraction: float, max_num_examples: int) -> None:
    """The checks of the round's sampling settings (the run's and a strategy's, one home).

    Raises:
        ConfigError: naming the setting and its value.

    """
    check(0.0 < fraction_train <= 1.0, f"fraction-train must be in (0, 1], got {fraction_train}")
    check(min_train_nodes >= 1, f"min-train-nodes must be at least 1, got {min_train_nodes}")
    check(0.0 <= fraction_evaluate <= 1.0,
          f"fraction-evaluate must be in [0, 1], got {fraction_evaluate}")
    check(0.0 <= min_reply_fraction <= 1.0,
          f"min-reply-fraction must be in [0, 1], got {min_reply_fraction}")
    check(max_num_examples >= 1, f"max-num-examples must be at least 1, got {max_num_examples}")


def connected_nodes(grid: Grid, at_least: int) -> list[int]:
    """The connected nodes (sorted), once at least ``at_least`` are; logs while it waits."""
    next_log = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= at_least:
            return nodes
        if time.monotonic() >= next_log:
            log(INFO, "waiting for nodes: %d connected, %d needed", len(nodes), at_least)
            next_log = time.monotonic() + 10
        time.sleep(NODE_POLL_INTERVAL)


class NodeSampler:
    """Samples a round's nodes with its own seeded generator (its state resumes a run)."""

    def __init__(self, seed: int, min_available_nodes: int) -> None:
        self.rng = random.Random(seed)
        self.min_available_nodes = min_available_nodes
        self.available = 0

    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """``max(fraction x connected, minimum)`` nodes, once enough are connected."""
        nodes = connected_nodes(grid, max(minimum, self.min_available_nodes))
        self.available = len(nodes)
        return self.rng.sample(nodes, max(int(len(nodes) * fraction), minimum))

    def state(self) -> list:
        """The generator's state, JSON-serialisable."""
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def load_state(self, state: list) -> None:
        """Restore :meth:`state`."""
        version, internal, gauss = state
        self.rng.setstate((version, tuple(internal), gauss))


def payload_message(
    payload: Payload, node_id: int, config: ConfigRecord, message_type: str,
    shared: dict[tuple[int, frozenset[str]], ArrayRecord] | None = None,
) -> tuple[Message, int]:
    """The message carrying ``payload`` to ``node_id``, and its array payload in bytes.

    Payloads with the same adapter object and parts share one ``ArrayRecord`` through
    ``shared`` (as Flower's FedAvg shares one record): the server's outgoing messages
    then cost one copy of the adapter, not one per sampled node.
    """
    key = (id(payload.adapter), payload.sent_parts)
    record = None if shared is None else shared.get(key)
    if record is None:
        record = state_to_record(select_parts(payload.adapter.to_state_dict(),
                                              payload.sent_parts))
        if shared is not None:
            shared[key] = record
    node_config = ConfigRecord(dict(config))
    node_config.update(payload.instructions.to_config())
    content = RecordDict({ARRAYS_KEY: record, CONFIG_KEY: node_config})
    message = Message(content=content, message_type=message_type, dst_node_id=node_id)
    return message, record_nbytes(record)
