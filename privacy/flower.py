"""End-to-end payload encryption wired into Flower: a strategy wrapper and client handlers.

Generic over Flower: any strategy whose messages carry an ``ArrayRecord`` under
``"arrays"`` can be wrapped. Per round and per sampled node:

1. the server sends a handshake query (its long-term public key ``S`` and this round's
   ephemeral key ``Es``); the client draws an ephemeral key ``Ec``, keeps its private
   half in ``context.state`` and answers with the public half;
2. the server seals the node's arrays for that node (keys from X25519 + HKDF, see
   :mod:`privacy.transport`) and replaces ``"arrays"`` by a ``"sealed"`` ConfigRecord;
3. the client opens it, runs the ClientApp, and seals its reply's arrays the same way;
4. the server opens the reply (size checked before anything else, replay guarded) and
   hands the plain message to the wrapped strategy. A reply that fails is logged with
   its reason and left out; the round goes on.

The relay (SuperLink) sees only public keys, ciphertext, and the clear header (run,
round, node ids, tensor manifest). Clients pin the server key with the node config
``server-key-pin`` (hex key or fingerprint); without a pin they trust the key of the
first handshake (acceptable in simulation, not against an active relay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from privacy.keys import ServerIdentity, fingerprint, verify_pinned
from privacy.transport import (
    EphemeralKey,
    PayloadContext,
    PayloadRejected,
    ReplayGuard,
    SealedPayload,
    SessionKeys,
    client_session_keys,
    open_sealed,
    seal_arrays,
    server_session_keys,
)

HANDSHAKE_TYPE = "query.fedlora_handshake"
SEALED_KEY = "sealed"
ARRAYS_KEY = "arrays"
HELLO_KEY = "fedlora.hello"
STATE_KEY = "fedlora.ephemeral"
SERVER_NODE = 0  # the server's id inside the associated data
REPLY_SLACK = 64 * 1024  # a reply may exceed what was sent by this much (metadata)


@dataclass
class RoundKeys:
    """The server's keys for one round."""

    ephemeral: EphemeralKey
    sessions: dict[int, SessionKeys] = field(default_factory=dict)
    sent_bytes: dict[int, int] = field(default_factory=dict)
    guard: ReplayGuard | None = None


class EncryptedStrategy(Strategy):
    """Wraps a Flower strategy so adapter payloads travel sealed, end to end.

    Args:
        inner: the strategy that decides what to send and how to aggregate.
        identity: the server's long-term key (its public key is what clients pin).
        handshake_timeout: seconds to wait for the handshake replies.

    """

    def __init__(self, inner: Strategy, identity: ServerIdentity | None = None,
                 handshake_timeout: float = 120.0) -> None:
        self.inner = inner
        self.identity = identity or ServerIdentity.generate()
        self.handshake_timeout = handshake_timeout
        self.rejections: dict[int, list[tuple[int, str]]] = {}
        self._rounds: dict[int, RoundKeys] = {}
        self._run_id = 0

    def summary(self) -> None:
        """Log the wrapped strategy and the server key fingerprint."""
        log(INFO, "\t├──> payloads sealed end to end; server key fingerprint %s",
            self.identity.fingerprint())
        self.inner.summary()

    # ---------------------------------------------------------------- sending

    def _handshake(self, server_round: int, nodes: list[int], grid: Grid) -> RoundKeys:
        keys = self._rounds.get(server_round)
        if keys is None:
            keys = self._rounds[server_round] = RoundKeys(EphemeralKey())
            keys.guard = ReplayGuard(run_id=self._run_id, receiver=SERVER_NODE,
                                     round=server_round)
        todo = [n for n in nodes if n not in keys.sessions]
        if not todo:
            return keys
        hello = ConfigRecord({"server-key": self.identity.public_key_bytes,
                              "server-ephemeral": keys.ephemeral.public_key_bytes,
                              "round": server_round})
        queries = [Message(RecordDict({HELLO_KEY: hello}), dst_node_id=n,
                           message_type=HANDSHAKE_TYPE) for n in todo]
        for reply in grid.send_and_receive(queries, timeout=self.handshake_timeout):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise PayloadRejected(f"handshake failed: {reply.error.reason}")
                client_key = reply.content.config_records[HELLO_KEY]["client-ephemeral"]
                keys.sessions[node] = server_session_keys(
                    self.identity, keys.ephemeral, client_public_key=client_key,
                    run_id=self._run_id, round=server_round, client_node=node)
            except (PayloadRejected, KeyError, TypeError) as exc:
                self._reject(server_round, node, f"handshake: {exc}")
        return keys

    def _seal_messages(self, server_round: int, messages: Iterable[Message],
                       grid: Grid) -> list[Message]:
        self._run_id = grid.run.run_id
        messages = list(messages)
        keys = self._handshake(server_round, [m.metadata.dst_node_id for m in messages], grid)
        sealed = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in keys.sessions:
                continue  # no handshake: the node is left out of this round
            content = message.content
            payload = seal_arrays(content.array_records[ARRAYS_KEY],
                                  key=keys.sessions[node].send,
                                  context=PayloadContext(self._run_id, server_round,
                                                         SERVER_NODE, node))
            keys.sent_bytes[node] = max(keys.sent_bytes.get(node, 0), len(payload.ciphertext))
            new = RecordDict({k: v for k, v in content.items() if k != ARRAYS_KEY})
            new[SEALED_KEY] = payload.to_record()
            new[HELLO_KEY] = ConfigRecord({
                "server-key": self.identity.public_key_bytes,
                "server-ephemeral": keys.ephemeral.public_key_bytes})
            sealed.append(Message(new, dst_node_id=node,
                                  message_type=message.metadata.message_type))
        return sealed

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's messages, with their arrays sealed per node."""
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        return self._seal_messages(server_round, messages, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Evaluation messages, sealed like training ones."""
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._seal_messages(server_round, messages, grid)

    # -------------------------------------------------------------- receiving

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        self.rejections.setdefault(server_round, []).append((node, reason))
        log(WARNING, "round %d: rejected message from node %d: %s", server_round, node, reason)

    def _open_replies(self, server_round: int, replies: Iterable[Message]) -> Iterator[Message]:
        """Open each sealed reply as it arrives (a generator: replies are not collected)."""
        keys = self._rounds.get(server_round)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                yield reply
                continue
            try:
                if keys is None or node not in keys.sessions:
                    raise PayloadRejected("reply from a node without keys for this round")
                content = reply.content
                if SEALED_KEY not in content.config_records:
                    raise PayloadRejected("plaintext reply while payload encryption is on")
                payload = SealedPayload.from_record(content.config_records[SEALED_KEY])
                arrays = open_sealed(
                    payload, key=keys.sessions[node].receive,
                    context=PayloadContext(self._run_id, server_round, node, SERVER_NODE),
                    max_bytes=keys.sent_bytes.get(node, 0) + REPLY_SLACK, guard=keys.guard)
            except PayloadRejected as exc:
                self._reject(server_round, node, exc.reason)
                continue
            except Exception as exc:  # noqa: BLE001 - never crash on a malformed reply
                self._reject(server_round, node, f"malformed sealed reply ({exc})")
                continue
            plain = RecordDict({k: v for k, v in content.items()
                                if k not in (SEALED_KEY, HELLO_KEY)})
            plain[ARRAYS_KEY] = _to_record(arrays)
            reply.content = plain
            yield reply

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Open every sealed reply, then let the wrapped strategy aggregate."""
        return self.inner.aggregate_train(server_round, self._open_replies(server_round, replies))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Evaluation replies carry no arrays; they go to the wrapped strategy as they are."""
        self._rounds.pop(server_round - 1, None)  # keys of finished rounds are dropped
        return self.inner.aggregate_evaluate(server_round, replies)


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


# ------------------------------------------------------------------------ client side


def handshake(message: Message, context: Context) -> Message:
    """Answer the server's handshake: a fresh ephemeral key for this round."""
    hello = message.content.config_records[HELLO_KEY]
    try:
        verify_pinned(hello["server-key"], _pin_for(hello["server-key"], context))
    except ValueError as exc:
        raise PayloadRejected(f"untrusted server: {exc}") from None
    ephemeral = EphemeralKey()
    context.state[STATE_KEY] = ConfigRecord({
        "round": int(hello["round"]), "private": ephemeral.private_bytes(),
        "server-key": hello["server-key"]})
    reply = ConfigRecord({"client-ephemeral": ephemeral.public_key_bytes})
    return Message(RecordDict({HELLO_KEY: reply}), reply_to=message)


def _pin_for(server_key: bytes, context: Context) -> str:
    """The configured pin, or (trust on first use) the fingerprint of the key received."""
    return str(context.node_config.get("server-key-pin", "")) or fingerprint(server_key)


def _session(message: Message, context: Context, server_round: int) -> SessionKeys:
    state = context.state.config_records.get(STATE_KEY)
    if state is None or int(state["round"]) != server_round:
        raise PayloadRejected(f"no handshake for round {server_round}")
    hello = message.content.config_records[HELLO_KEY]
    if hello["server-key"] != state["server-key"]:
        raise PayloadRejected("server key changed within the round")
    return client_session_keys(
        EphemeralKey.from_private_bytes(state["private"]),
        server_public_key=hello["server-key"], server_ephemeral_key=hello["server-ephemeral"],
        pin=_pin_for(hello["server-key"], context), run_id=message.metadata.run_id,
        round=server_round, client_node=context.node_id)


def encryption_mod(message: Message, context: Context,
                   call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: open sealed payloads before the handler, seal the reply's arrays.

    Plain messages pass through unless the node config sets ``require-encryption``.
    """
    content = message.content if message.has_content() else None
    if content is None or SEALED_KEY not in content.config_records:
        if bool(context.node_config.get("require-encryption", False)) and content is not None \
                and ARRAYS_KEY in content.array_records:
            raise PayloadRejected("plaintext payload refused: this node requires encryption")
        return call_next(message, context)
    payload = SealedPayload.from_record(content.config_records[SEALED_KEY])
    keys = _session(message, context, payload.round)
    arrays = open_sealed(payload, key=keys.receive,
                         context=PayloadContext(message.metadata.run_id, payload.round,
                                                SERVER_NODE, context.node_id),
                         max_bytes=len(payload.ciphertext))
    plain = RecordDict({k: v for k, v in content.items() if k not in (SEALED_KEY, HELLO_KEY)})
    plain[ARRAYS_KEY] = _to_record(arrays)
    message.content = plain
    reply = call_next(message, context)
    if not reply.has_content() or ARRAYS_KEY not in reply.content.array_records:
        return reply
    sealed = seal_arrays(reply.content.array_records[ARRAYS_KEY], key=keys.send,
                         context=PayloadContext(message.metadata.run_id, payload.round,
                                                context.node_id, SERVER_NODE))
    out = RecordDict({k: v for k, v in reply.content.items() if k != ARRAYS_KEY})
    out[SEALED_KEY] = sealed.to_record()
    reply.content = out
    return reply
