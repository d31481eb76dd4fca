"""Sending a round's messages and handing back each reply as soon as it arrives."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
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
    """
    pending = set(grid.push_messages(messages))
    return _pull_replies(grid, pending, deadline=time.monotonic() + timeout)


def _pull_replies(grid: Grid, pending: set[str], *, deadline: float) -> Iterator[Message]:
    while pending:
        arrived = False
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            arrived = True
            yield reply
        if not pending or time.monotonic() >= deadline:
            return
        if not arrived:
            time.sleep(PULL_INTERVAL)
