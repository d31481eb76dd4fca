"""server.replies.stream_replies: push at once, hand each reply on, name failed nodes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from flwr.app import Metadata
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from server.replies import stream_replies


class Grid:
    """Node 7 answers; node 9 is dead, so the SuperLink answers for it with an error."""

    def __init__(self) -> None:
        self.pushed: list[Any] = []
        self.pulls = 0

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed = list(messages)
        return [f"id-{m.metadata.dst_node_id}" for m in self.pushed]

    def pull_messages(self, ids: list[str]) -> list[Any]:
        self.pulls += 1
        replies = []
        if "id-7" in ids:
            replies.append(SimpleNamespace(
                has_error=lambda: False,
                metadata=SimpleNamespace(src_node_id=7, reply_to_message_id="id-7")))
        if "id-9" in ids:
            sent = Metadata(run_id=1, message_id="id-9", src_node_id=1, dst_node_id=9,
                            reply_to_message_id="", group_id="1", created_at=0.0,
                            ttl=3600.0, message_type="train")
            replies.append(create_message_error_unavailable_res_message(sent, "node_unavail"))
        return replies


def _message(node: int) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))


def test_messages_are_pushed_before_the_first_reply_is_asked_for() -> None:
    grid = Grid()
    replies = stream_replies(grid, (_message(n) for n in (7, 9)), timeout=5)
    assert len(grid.pushed) == 2 and grid.pulls == 0
    assert len(list(replies)) == 2 and grid.pulls == 1


def test_an_error_the_superlink_sends_for_a_dead_node_names_that_node() -> None:
    replies = list(stream_replies(Grid(), [_message(7), _message(9)], timeout=5))
    failed = [r for r in replies if r.has_error()]
    assert len(failed) == 1
    assert failed[0].metadata.src_node_id == 9  # not the SuperLink's own id (1)
    assert "Node Unavailable" in failed[0].error.reason
    assert [r.metadata.src_node_id for r in replies if not r.has_error()] == [7]
