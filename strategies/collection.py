"""Replies in: validate each as it arrives, count failures and rejections, average scores.

:func:`collect_updates` turns a round's reply stream into validated updates one at a
time (a bad reply is counted and logged with its reason, never aggregated, and never
raises); :func:`average_scores` is the example-weighted mean of federated evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from logging import WARNING

from flwr.app import Message, MetricRecord
from flwr.supercore import log

from strategies.adapter import LoraAdapter
from strategies.codec import ARRAYS_KEY, METRICS_KEY, record_nbytes
from strategies.errors import UpdateRejected
from strategies.messaging import Payload
from strategies.round_stats import RoundStats
from strategies.validation import ClientUpdate, UpdateSpec, validate_num_examples, validate_update


def collect_updates(
    replies: Iterable[Message], stats: RoundStats, specs: Mapping[int, UpdateSpec],
    payloads: Mapping[int, Payload], check: Callable[[ClientUpdate], None],
) -> Iterator[ClientUpdate]:
    """Validate replies as they arrive; count and log failures and rejections in ``stats``.

    Yields each valid update once, its ``adapter`` completed with what the node was sent
    (``payloads``) for the parts it did not send; the caller folds it in and drops it, so
    no more than one reply is held at a time. ``check`` adds the strategy's own rules
    (it raises :class:`UpdateRejected`). Train loss and client epsilons are kept in the
    round's stats as running figures.
    """
    seen: set[int] = set()
    for message in replies:
        node_id = message.metadata.src_node_id
        if message.has_error():
            stats.failed += 1
            stats.failures.append((node_id, str(message.error.reason)))
            stats.failure_codes[node_id] = int(message.error.code)
            log(WARNING, "round %d: node %d failed: %s", stats.round, node_id,
                message.error.reason)
            continue
        spec = specs.get(node_id)
        try:
            if spec is None:
                raise UpdateRejected("reply from a node not sampled in this round")
            if node_id in seen:
                raise UpdateRejected("second reply from the same node in this round")
            update = validate_update(message.content, spec, node_id=node_id)
            check(update)
            sent = payloads[node_id]
            update.adapter = LoraAdapter.from_state_dict(
                {**sent.adapter.to_state_dict(), **update.state}, sent.instructions.alpha)
        except UpdateRejected as exc:
            stats.reject(node_id, exc.reason)
            continue
        except Exception as exc:  # noqa: BLE001 - a malformed reply never crashes the server
            stats.reject(node_id, f"malformed reply ({type(exc).__name__}: {exc})")
            continue
        seen.add(node_id)
        stats.accept(node_id, update.adapter.max_rank,
                     record_nbytes(message.content.array_records[ARRAYS_KEY]),
                     update.metrics, update.num_examples)
        del message
        yield update
    missing = stats.sampled - stats.accepted - stats.rejected - stats.failed
    if missing > 0:
        stats.metrics["num-missing"] = float(missing)
        log(WARNING, "round %d: no reply from %d sampled node(s) reached the strategy "
            "(round timeout, or dropped by the transport layer); left out",
            stats.round, missing)


def average_scores(replies: Iterable[Message], server_round: int,
                   max_num_examples: int) -> dict[str, float]:
    """Example-weighted mean of the clients' ``eval-*`` scores as ``fed-eval-*``.

    Malformed replies (and non-finite scores) are left out with a logged reason.
    """
    totals: dict[str, float] = {}
    weight = 0
    for message in replies:
        try:
            metrics = message.content.metric_records[METRICS_KEY]
            n = validate_num_examples(metrics["num-examples"], max_num_examples)
            scores = {k: float(v) for k, v in metrics.items()
                      if k.startswith("eval-") and isinstance(v, int | float)}
        except Exception as exc:  # noqa: BLE001 - a bad reply never crashes the server
            log(WARNING, "round %d: evaluation reply left out: %s", server_round, exc)
            continue
        if not all(math.isfinite(v) for v in scores.values()):
            continue
        weight += n
        for key, value in scores.items():
            totals[key] = totals.get(key, 0.0) + n * value
    return {f"fed-{k}": v / weight for k, v in totals.items()} if weight else {}


def round_metrics(stats: RoundStats) -> MetricRecord:
    """The round's counters as a Flower ``MetricRecord``."""
    record = MetricRecord({
        "num-accepted": stats.accepted,
        "num-rejected": stats.rejected,
        "num-failed": stats.failed,
        "bytes-up": stats.bytes_up,
        "bytes-down": stats.bytes_down,
    })
    if stats.train_loss is not None:
        record["train-loss"] = stats.train_loss
    record.update(stats.metrics)
    return record
