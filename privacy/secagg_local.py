"""The SecAgg+ round among in-process clients: the reference driver of tests and benchmarks.

Every message goes through its JSON encoding, as it would over a network; the seconds
each side spends per stage are measured (the clients' summed over clients).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from privacy.secagg_protocol import STAGES, ClientRound, ServerRound, decode, encode


@dataclass
class LocalRun:
    """What :func:`run_locally` returns: the server's side, the sum, and the costs."""

    server: ServerRound
    total: np.ndarray
    server_seconds: dict[str, float]
    client_seconds: dict[str, float]


def run_locally(inputs: Mapping[int, np.ndarray], *, degree: int, threshold: int,
                gone_before_mask: tuple[int, ...] = (), gone_before_unmask: tuple[int, ...] = (),
                seed: int | None = None, record: list[bytes] | None = None) -> LocalRun:
    """One round among in-process clients, every message through its JSON encoding.

    ``inputs`` maps node ids to their ring vectors; nodes in ``gone_before_mask`` drop
    after sharing keys, those in ``gone_before_unmask`` after sending their masked input.
    ``record`` collects every byte string the server receives. The seconds are summed
    over the stages' work on each side (the clients' summed over clients); the bytes of
    every message (masked vectors as raw ring elements) are in ``server.stages``.

    Raises:
        RoundAborted: too many dropouts.

    """
    nodes = sorted(inputs)
    rng = random.Random(seed) if seed is not None else None
    server_seconds = {name: 0.0 for name in STAGES}
    client_seconds = {name: 0.0 for name in STAGES}
    clients: dict[int, ClientRound] = {}

    def timed(side: dict[str, float], stage: str, fn: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            side[stage] += time.perf_counter() - started

    def roundtrip(stage: str, requests: Mapping[int, dict[str, Any]], handler: Any,
                  skip: tuple[int, ...] = ()) -> dict[int, dict[str, Any]]:
        figures = server.stages[stage]
        replies = {}
        for node, request in requests.items():
            if node in skip:
                continue
            sent = encode(request)
            figures.bytes_down += len(sent)
            reply = encode(timed(client_seconds, stage, handler, node, decode(sent)))
            figures.bytes_up += len(reply)
            if record is not None:
                record.append(reply)
            replies[node] = decode(reply)
        return replies

    def start(node: int, request: dict[str, Any]) -> dict[str, Any]:
        clients[node], reply = ClientRound.start(node, request)
        return reply

    server = timed(server_seconds, "setup", lambda: ServerRound(
        0, 1, nodes, degree=degree, threshold=threshold, rng=rng))
    setup = timed(server_seconds, "setup", server.setup_requests)
    asked = timed(server_seconds, "setup", server.receive_keys,
                  roundtrip("setup", setup, start))
    replies = roundtrip("share-keys", asked, lambda n, r: clients[n].share_keys(r))
    masking = timed(server_seconds, "share-keys", server.receive_shares, replies, asked)
    for node, request in masking.items():
        if node in gone_before_mask:
            continue
        sent = encode(request)
        server.stages["masked-input"].bytes_down += len(sent)
        timed(client_seconds, "masked-input", clients[node].receive_shares, decode(sent))
        masked = timed(client_seconds, "masked-input", clients[node].mask, inputs[node])
        server.stages["masked-input"].bytes_up += masked.nbytes
        if record is not None:
            record.append(masked.tobytes())
        timed(server_seconds, "masked-input", server.add_masked, node, masked)
    requests = timed(server_seconds, "unmask", server.unmask_requests)
    replies = roundtrip("unmask", requests, lambda n, r: clients[n].unmask(r),
                        skip=tuple(gone_before_unmask))
    total = timed(server_seconds, "unmask", server.unmask, replies)
    return LocalRun(server, total, server_seconds, client_seconds)
