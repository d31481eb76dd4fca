"""Sending a round's messages and handing back each reply as soon as it arrives."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

PULL_INTERVAL = 0.1  # seconds between polls of the grid


def stream_replies(grid: Grid, messages: Iterable[Message], *, timeout: float) -> Iterator[Message]:
    """Push ``messages`` now; return an iterator that yields each reply the moment it arrives.

    The push happens in this call, not on the first ``next``, so the server can do other
    work (evaluate the previous global adapter) while the nodes train. Unlike
    ``Grid.send_and_receive``, replies are not collected into a list first: a consumer
    that folds each reply into a running aggregate and drops it holds one reply at a
    time. The iterator stops when every message has its reply or ``timeout`` seconds
    after the push; the nodes that did not answer by then are simply missing.

    An error the SuperLink sends on a node's behalf (Flower 1.42's "Node Unavailable"
    when a node stops heartbeating) comes from the SuperLink's own node id; it is handed
    on as coming from the node the message was sent to, so the failure names that node.
    """
    messages = list(messages)
    ids = grid.push_messages(messages)
    destination = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
    return _pull_replies(grid, destination, deadline=time.monotonic() + timeout)


def _pull_replies(grid: Grid, destination: dict[str, int], *,
                  deadline: float) -> Iterator[Message]:
    pending = set(destination)
    while pending:
        arrived = False
        for reply in grid.pull_messages(list(pending)):
            replied_to = reply.metadata.reply_to_message_id
            pending.discard(replied_to)
            arrived = True
            if reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID:
                node = destination.get(replied_to)
                if node is not None:  # Metadata has no setter; Flower sets ids this way too
                    reply.metadata.__dict__["_src_node_id"] = node
            yield reply
        if not pending or time.monotonic() >= deadline:
            return
        if not arrived:
            time.sleep(PULL_INTERVAL)
