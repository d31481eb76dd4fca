"""Secure aggregation wired into Flower's Message API: a strategy wrapper and a ClientApp mod.

Why one module of about 500 lines: the server wrapper and the client mod are the two
ends of the same four stages (:mod:`privacy.secagg_protocol`); every record one builds
the other reads.

:class:`SecureAggregation` wraps a :class:`strategies.base.LoraStrategy`. In
``configure_train`` it runs the setup and share-keys stages over the grid (query
messages of type ``query.fedlora_secagg``) with the nodes the strategy sampled, then
hands each surviving node its train message with the routed shares and the encoding
(:mod:`privacy.secagg_field`). On the client, :func:`secure_aggregation_mod` answers the
queries and, around training, replaces the reply's adapter by one masked vector in the
ring: the parts the strategy sends, zero-padded to the global shapes, clipped,
quantized, multiplied by the client's weight, followed by the weighted loss, the
clipped count and the weight. In ``aggregate_train`` the wrapper sums the masked vectors
as they arrive, runs the unmask stage, decodes the sum and gives the strategy the
weighted mean (:meth:`strategies.base.LoraStrategy.aggregate_secure_mean`).

What the server can still check, per reply: the sender was asked, once; one array of
the ring's dtype and exactly the expected length, sized before it is decoded; a rank in
range. On the sum: the summed weight lies in ``[n, n x secagg-max-weight]``, every
coordinate within ``weight x levels`` (else a client sent values outside the field and
the round is abandoned). What it gives up: every per-update check (shapes inside the
vector, the update-norm and direction screens, the robust aggregators, per-client losses
and example counts). The reply keeps one metric in clear, the adapter ``rank``.

Composes with payload encryption (the masked vector is sealed like any adapter; the
queries carry public keys and client-to-client ciphertexts only), with DP-SGD (the
client trains as always) and with client-level DP (each client clips its own change to
``client-dp-clip`` and weighs itself 1; the server adds the noise to the unmasked mean).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from privacy.secagg_config import SecureAggregationConfig
from privacy.secagg_field import TAIL, FieldError, FieldSpec
from privacy.secagg_protocol import (
    ClientRound,
    ProtocolError,
    RoundAborted,
    ServerRound,
    auto_degree,
    auto_threshold,
    decode,
    encode,
)
from strategies.aggregation import SecureMean
from strategies.base import LoraStrategy
from strategies.codec import ARRAYS_KEY, METRICS_KEY, check_array_header, decode_array
from strategies.collection import round_metrics
from strategies.config import ConfigError, convert
from strategies.errors import UpdateRejected
from strategies.round_stats import RoundStats

SECAGG_TYPE = "query.fedlora_secagg"
SECAGG_KEY = "fedlora.secagg"
MASKED_KEY = "secagg.masked"
STATE_KEY = "fedlora.secagg-state"
REQUIRE_KEY = "require-secure-aggregation"  # node config: refuse to train in the clear
#: the only reply metric that stays in clear (HetLoRA's pruned rank)
PUBLIC_METRICS = ("rank",)
SECAGG_ERROR_CODE = 4003
#: a protocol reply holds at most 255 shares of about 200 bytes; anything far larger is refused
MAX_REPLY_BYTES = 2**20


class SecureAggregation(Strategy):
    """Runs a LoRA strategy so that the server sees only the weighted sum of each round.

    Args:
        inner: the strategy; its rule must be linear in what clients send
            (:meth:`~strategies.base.LoraStrategy.secure_aggregation_refusal_for`).
        config: the ``secure-aggregation`` settings.
        timeout: seconds each protocol stage waits for replies.

    Raises:
        ConfigError: the strategy refuses secure aggregation.

    """

    def __init__(self, inner: LoraStrategy, config: SecureAggregationConfig,
                 timeout: float = 600.0) -> None:
        refusal = inner.secure_aggregation_refusal_for(inner.config)
        if refusal:
            raise ConfigError(f"strategy {inner.name} cannot run with secure-aggregation=true: "
                              f"{refusal}")
        self.inner = inner
        self.config = config
        self.timeout = timeout
        inner.individual_updates_visible = False
        self._protocol: ServerRound | None = None
        self._field: FieldSpec | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._grid: Grid | None = None
        self._masking_started = 0.0

    def summary(self) -> None:
        """Log the protocol's settings, what the server gives up, then the strategy's."""
        c = self.config
        log(INFO, "\t├──> secure aggregation (SecAgg+): degree %s, threshold %s, values "
            "clipped to ±%g at %d bits (rounding error %.2g), weights capped at %d",
            c.secagg_degree or "auto", c.secagg_threshold or "auto", c.secagg_clip_range,
            c.secagg_bits, c.rounding_error(), c.secagg_max_weight)
        log(INFO, "\t├──> the server sees only each round's sum: per-update screens "
            "(update-norm-bound, update-min-cosine, update-max-abs) are not applied")
        self.inner.summary()

    # ----------------------------------------------------------------- stages

    def _exchange(self, protocol: ServerRound, stage: str,
                  requests: Mapping[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Send one stage's queries, collect the replies that parse (others drop out)."""
        assert self._grid is not None
        started = time.monotonic()
        figures = protocol.stages[stage]
        messages = []
        for node, request in requests.items():
            payload = encode({**request, "round": protocol.server_round})
            figures.bytes_down += len(payload)
            messages.append(Message(RecordDict({SECAGG_KEY: ConfigRecord({"payload": payload})}),
                                    dst_node_id=node, message_type=SECAGG_TYPE))
        replies: dict[int, dict[str, Any]] = {}
        for reply in self._grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if node not in requests or node in replies:
                continue
            try:
                if reply.has_error():
                    raise ProtocolError(str(reply.error.reason))
                payload = reply.content.config_records[SECAGG_KEY]["payload"]
                if not isinstance(payload, bytes):
                    raise ProtocolError("the reply's payload is not bytes")
                figures.bytes_up += len(payload)
                replies[node] = decode(payload, max_bytes=MAX_REPLY_BYTES)
            except (KeyError, ProtocolError) as exc:
                protocol.drop(node, f"{stage}: {exc}")
        figures.seconds += time.monotonic() - started
        return replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The strategy's train messages, after setup and share-keys, for the nodes left."""
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._protocol, self._grid = None, grid
        stats = self.inner.history.setdefault(server_round, RoundStats(round=server_round))
        nodes = [m.metadata.dst_node_id for m in messages]
        if not nodes:
            return []
        if len(nodes) < 2:
            self._abort(stats, f"{len(nodes)} client sampled: the sum of one client is its "
                        "update, so secure aggregation needs at least 2 per round")
            return []
        degree = min(self.config.secagg_degree or auto_degree(len(nodes)), len(nodes) - 1)
        threshold = self.config.secagg_threshold or auto_threshold(degree)
        try:
            protocol = ServerRound(grid.run.run_id, server_round, nodes, degree=degree,
                                   threshold=threshold)
        except ProtocolError as exc:
            self._abort(stats, str(exc))
            return []
        asked = protocol.receive_keys(self._exchange(protocol, "setup",
                                                     protocol.setup_requests()))
        masking = protocol.receive_shares(self._exchange(protocol, "share-keys", asked), asked)
        try:
            if len(masking) < threshold:
                raise RoundAborted(f"{len(masking)} client(s) completed the key exchange, "
                                   f"secagg-threshold {threshold} needed")
            field = FieldSpec.for_clients(self.config.secagg_clip_range, self.config.secagg_bits,
                                          self.config.secagg_max_weight, len(masking))
        except (RoundAborted, FieldError) as exc:
            self._record(stats, protocol)
            self._abort(stats, str(exc))
            return []
        self._shapes = self.inner.summand_shapes()
        clip = float(getattr(self.inner.client_dp, "clip_norm", 0.0) or 0.0)
        kept = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in masking:
                reason = f"left out by secure aggregation: {protocol.dropped.get(node, '?')}"
                stats.failed += 1
                stats.failures.append((node, reason))
                continue
            payload = encode({**masking[node], "round": server_round,
                              "field": [field.clip_range, field.bits, field.max_weight,
                                        field.ring_bits],
                              "spec": [[k, list(s)] for k, s in sorted(self._shapes.items())],
                              "client_dp_clip": clip})
            protocol.stages["masked-input"].bytes_down += len(payload)
            message.content[SECAGG_KEY] = ConfigRecord({"payload": payload})
            kept.append(message)
        self._protocol, self._field = protocol, field
        self._masking_started = time.monotonic()
        return kept

    def _masked_input(self, reply: Message, length: int) -> tuple[np.ndarray, int, int | None]:
        """The reply's masked vector, its bytes and its rank; checked before decoding."""
        assert self._field is not None
        content = reply.content
        if set(content.array_records) != {ARRAYS_KEY}:
            raise UpdateRejected(f"expected one ArrayRecord '{ARRAYS_KEY}'")
        record = content.array_records[ARRAYS_KEY]
        if set(record.keys()) != {MASKED_KEY}:
            raise UpdateRejected(f"a secure reply holds exactly one array '{MASKED_KEY}'")
        array = record[MASKED_KEY]
        check_array_header(MASKED_KEY, array, (length,), frozenset({self._field.dtype.name}))
        vector = decode_array(MASKED_KEY, array)
        if vector.shape != (length,):
            raise UpdateRejected(f"masked input of shape {vector.shape}, expected ({length},)")
        rank = None
        metrics = content.metric_records.get(METRICS_KEY)
        if metrics is not None and "rank" in metrics:
            value = metrics["rank"]
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    value != int(value) or value < 1:
                raise UpdateRejected(f"rank must be a positive whole number, got {value!r}")
            rank = int(value)
            payload = self.inner.sent_payload(reply.metadata.src_node_id)
            if payload is not None and rank > payload.instructions.rank:
                raise UpdateRejected(f"rank {rank} is above the {payload.instructions.rank} "
                                     "this node was sent")
        return vector, len(array.data), rank

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the masked inputs as they arrive, unmask, hand the mean to the strategy."""
        stats = self.inner.history.setdefault(server_round, RoundStats(round=server_round))
        protocol, field = self._protocol, self._field
        if protocol is None or field is None:
            for _ in replies:
                pass
            return None, round_metrics(stats)
        length = sum(math.prod(s) for s in self._shapes.values()) + TAIL
        ranks: dict[int, int] = {}
        seen = 0
        for reply in replies:
            seen += 1
            node = reply.metadata.src_node_id
            if reply.has_error():
                stats.failed += 1
                stats.failures.append((node, str(reply.error.reason)))
                stats.failure_codes[node] = int(reply.error.code)
                log(WARNING, "round %d: node %d failed: %s", server_round, node,
                    reply.error.reason)
                continue
            try:
                vector, nbytes, rank = self._masked_input(reply, length)
                protocol.add_masked(node, vector)
            except (UpdateRejected, ProtocolError) as exc:
                stats.reject(node, getattr(exc, "reason", str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - a malformed reply never crashes the server
                stats.reject(node, f"malformed reply ({type(exc).__name__}: {exc})")
                continue
            stats.bytes_up += nbytes
            protocol.stages["masked-input"].bytes_up += nbytes
            if rank is not None:
                ranks[node] = rank
        protocol.stages["masked-input"].seconds = time.monotonic() - self._masking_started
        missing = len(protocol.u2) - seen
        if missing > 0:
            stats.metrics["num-missing"] = float(missing)
            log(WARNING, "round %d: no reply from %d sampled node(s) reached the strategy "
                "(round timeout, or dropped by the transport layer); left out",
                server_round, missing)
        try:
            requests = protocol.unmask_requests()
            replies = self._exchange(protocol, "unmask", requests)
            started = time.monotonic()
            total = protocol.unmask(replies)
            protocol.stages["unmask"].seconds += time.monotonic() - started
            values, loss, weight, clipped = field.decode(total, len(protocol.u3))
        except (RoundAborted, FieldError) as exc:
            self._record(stats, protocol)
            return self._abort(stats, str(exc))
        self._record(stats, protocol, clipped=clipped)
        state, offset = {}, 0
        for key, shape in sorted(self._shapes.items()):
            size = math.prod(shape)
            state[key] = values[offset:offset + size].reshape(shape).astype(np.float32)
            offset += size
        mean = SecureMean(state=state, weight=weight, contributors=tuple(protocol.u3),
                          train_loss=loss, ranks={n: r for n, r in ranks.items()
                                                  if n in protocol.u3})
        log(INFO, "round %d: secure sum of %d client(s) unmasked (%d dropout(s) recovered)",
            server_round, len(protocol.u3), int(stats.metrics["secagg-dropouts-recovered"]))
        return self.inner.aggregate_secure_mean(server_round, mean)

    def _abort(self, stats: RoundStats, reason: str) -> tuple[None, MetricRecord]:
        """Abandon the round: the global adapter stays as it was; say why."""
        log(WARNING, "round %d: secure aggregation aborted: %s; the global adapter is "
            "unchanged", stats.round, reason)
        stats.metrics["abandoned"] = 1.0
        stats.details.setdefault("secure_aggregation", {})["aborted"] = reason
        self._protocol = None
        return None, round_metrics(stats)

    def _record(self, stats: RoundStats, protocol: ServerRound,
                clipped: int | None = None) -> None:
        """The round's protocol figures into its metrics and ``details.json``."""
        details = protocol.telemetry()
        if self._field is not None:
            details.update(ring_bits=self._field.ring_bits,
                           rounding_error=self._field.rounding_error())
        if clipped is not None:
            details["clipped_values"] = clipped
            stats.metrics["secagg-clipped-values"] = float(clipped)
        stats.details["secure_aggregation"] = details
        for name, figures in protocol.stages.items():
            stats.metrics[f"secagg-{name}-clients"] = float(figures.clients_out)
            stats.metrics[f"secagg-{name}-bytes"] = float(figures.bytes_down + figures.bytes_up)
            stats.metrics[f"secagg-{name}-seconds"] = figures.seconds
            if name != "masked-input":  # the masked vectors are counted as they arrive
                stats.bytes_up += figures.bytes_up
            stats.bytes_down += figures.bytes_down
        answered = protocol.stages["unmask"].clients_out
        stats.metrics["secagg-dropouts-recovered"] = float(
            len(protocol.u2) - len(protocol.u3) + max(len(protocol.u3) - answered, 0))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Federated evaluation as the strategy does it (scores are not updates)."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """The strategy's evaluation averaging."""
        return self.inner.aggregate_evaluate(server_round, replies)


# ------------------------------------------------------------------------ client side


def pad_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` zero-padded at the end of each axis to ``shape`` (a lower-rank factor).

    Raises:
        ProtocolError: ``array`` does not fit in ``shape``.

    """
    if array.ndim != len(shape) or any(a > s for a, s in zip(array.shape, shape, strict=True)):
        raise ProtocolError(f"an array of shape {array.shape} does not fit {shape}")
    return np.pad(array, [(0, s - a) for a, s in zip(array.shape, shape, strict=True)])


def summand(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray],
            spec: list[tuple[str, tuple[int, ...]]], *, clip_norm: float,
            num_examples: int, max_weight: int) -> tuple[np.ndarray, int]:
    """What a client adds into the secure sum, flattened in ``spec`` order, and its weight.

    Each tensor is zero-padded to its global shape. With ``clip_norm`` above 0
    (client-level DP) the change from what was sent is clipped to that L2 norm and the
    weight is 1; otherwise the weight is the example count, capped at ``max_weight``.

    Raises:
        ProtocolError: the reply lacks a tensor the sum needs.

    """
    values, refs = [], []
    for key, shape in spec:
        if key not in arrays:
            raise ProtocolError(f"the reply lacks '{key}', which the secure sum needs")
        values.append(pad_to(np.asarray(arrays[key], dtype=np.float64), shape).ravel())
        ref = sent.get(key)
        refs.append(np.zeros(math.prod(shape)) if ref is None else
                    pad_to(np.asarray(ref, dtype=np.float64), shape).ravel())
    flat = np.concatenate(values) if values else np.zeros(0)
    if clip_norm > 0:
        reference = np.concatenate(refs) if refs else np.zeros(0)
        change = flat - reference
        norm = float(np.linalg.norm(change))
        factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        return reference + factor * change, 1
    weight = int(num_examples)
    if weight > max_weight:
        log(WARNING, "secure aggregation: %d examples weigh as secagg-max-weight %d",
            weight, max_weight)
        weight = max_weight
    return flat, max(weight, 1)


def _load(context: Context, request: Mapping[str, Any], run_id: int) -> ClientRound:
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        raise ProtocolError("no secure-aggregation setup on this node for this round")
    state = ClientRound.load(record["state"])
    if state.server_round != int(request.get("round", -1)) or state.run_id != run_id:
        raise ProtocolError(f"no secure-aggregation setup for round {request.get('round')}")
    return state


def _store(context: Context, state: ClientRound) -> None:
    context.state[STATE_KEY] = ConfigRecord({"state": state.dump()})


def answer_query(message: Message, context: Context) -> Message:
    """Answer one of the server's protocol queries (setup, share-keys, unmask).

    A ClientApp registers it as its ``fedlora_secagg`` query handler.
    """
    try:
        request = decode(message.content.config_records[SECAGG_KEY]["payload"])
        stage, run_id = request.get("stage"), message.metadata.run_id
        if stage == "setup":
            if int(request.get("run", -1)) != run_id:
                raise ProtocolError("setup request for another run")
            state, reply = ClientRound.start(context.node_id, request)
        elif stage == "share-keys":
            state = _load(context, request, run_id)
            reply = state.share_keys(request)
        elif stage == "unmask":
            state = _load(context, request, run_id)
            reply = state.unmask(request)
            state.c_key = state.s_key = state.seed = b""  # nothing secret outlives the round
            state.inbox, state.own_share = {}, (b"", b"")
        else:
            raise ProtocolError(f"unknown secure-aggregation stage {stage!r}")
        _store(context, state)
    except (ProtocolError, KeyError, TypeError, ValueError) as exc:
        log(WARNING, "secure aggregation: refused a query: %s", exc)
        return Message(Error(code=SECAGG_ERROR_CODE, reason=f"secure aggregation: {exc}"),
                       reply_to=message)
    return Message(RecordDict({SECAGG_KEY: ConfigRecord({"payload": encode(reply)})}),
                   reply_to=message)


def secure_aggregation_mod(message: Message, context: Context,
                           call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: mask the training reply of a round that asks for a secure sum.

    The protocol's queries are answered by :func:`answer_query` (a query handler, as
    Flower requires one per message type). A node whose config sets
    ``require-secure-aggregation=true`` refuses to train for a server that does not ask
    for a secure sum.
    """
    kind = message.metadata.message_type
    content = message.content if message.has_content() else None
    if kind != MessageType.TRAIN or content is None:
        return call_next(message, context)
    if SECAGG_KEY not in content.config_records:
        if convert(REQUIRE_KEY, context.node_config.get(REQUIRE_KEY, False), "bool"):
            return Message(Error(code=SECAGG_ERROR_CODE, reason=(
                "secure aggregation: this node requires it (require-secure-aggregation=true) "
                "and the server did not ask for it")), reply_to=message)
        return call_next(message, context)
    try:
        request = decode(content.config_records[SECAGG_KEY]["payload"])
        state = _load(context, request, message.metadata.run_id)
        state.receive_shares(request)
        clip_range, bits, max_weight, ring_bits = request["field"]
        field = FieldSpec(float(clip_range), int(bits), int(max_weight), int(ring_bits))
        spec = [(str(k), tuple(int(d) for d in s)) for k, s in request["spec"]]
        clip = float(request["client_dp_clip"])
    except (ProtocolError, KeyError, TypeError, ValueError) as exc:
        return Message(Error(code=SECAGG_ERROR_CODE, reason=f"secure aggregation: {exc}"),
                       reply_to=message)
    sent = {k: a.numpy() for k, a in content.array_records.get(ARRAYS_KEY, {}).items()}
    reply = call_next(message, context)
    if reply.has_error() or not reply.has_content():
        return reply
    metrics = reply.content.metric_records.get(METRICS_KEY, MetricRecord())
    arrays = {k: a.numpy() for k, a in reply.content.array_records.get(ARRAYS_KEY, {}).items()}
    try:
        values, weight = summand(arrays, sent, spec, clip_norm=clip,
                                 num_examples=int(metrics.get("num-examples", 1)),
                                 max_weight=field.max_weight)
        vector = field.encode(values, weight, float(metrics.get("train-loss", math.nan)))
    except (ProtocolError, FieldError) as exc:
        return Message(Error(code=SECAGG_ERROR_CODE, reason=f"secure aggregation: {exc}"),
                       reply_to=message)
    masked = state.mask(vector)
    _store(context, state)
    public = MetricRecord({k: metrics[k] for k in PUBLIC_METRICS if k in metrics})
    reply.content = RecordDict({ARRAYS_KEY: ArrayRecord({MASKED_KEY: Array(masked)}),
                                METRICS_KEY: public})
    return reply
