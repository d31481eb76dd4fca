"""End-to-end payload encryption wired into Flower: a strategy wrapper and client handlers.

Why one module of about 480 lines: the server wrapper and the client mod are the two
ends of one handshake and sealing protocol; they are read and changed together.

Generic over Flower: any strategy whose messages carry an ``ArrayRecord`` under
``"arrays"`` can be wrapped. For each round, each message type (train, evaluate) and
each sampled node:

1. the server sends a handshake query (its long-term public key ``S``, a fresh ephemeral
   key ``Es``, the round and the message type); the client checks ``S`` against its pin,
   draws an ephemeral key ``Ec``, keeps its private half in ``context.state`` and answers
   with the public half, signed with its long-term Ed25519 key when it has one
   (:mod:`privacy.client_keys`); a server with ``client-keys-file`` admits only handshakes
   signed by a listed key, each key speaking for one node;
2. the server seals the node's arrays for that node (keys from X25519 + HKDF, see
   :mod:`privacy.transport`) and replaces ``"arrays"`` by a ``"sealed"`` ConfigRecord;
   the message type and every config and metric record travel in clear but are bound
   into the associated data (:func:`clear_binding`), so the relay cannot change the
   instructions, the reported example count, or turn a train payload into an evaluate one;
3. the client opens it, runs the ClientApp, and seals its reply the same way (a reply
   without arrays is sealed as an empty payload, which still authenticates its metrics),
   then drops its ephemeral key;
4. the server opens the reply (size checked before anything else, replay guarded) and
   hands the plain message to the wrapped strategy, then drops the round's keys once the
   replies are aggregated. A reply that fails is logged with its reason and left out.

Pinning (node config): ``server-key-pin`` (hex key or fingerprint) if set; otherwise the
key of the first handshake is pinned in ``server-pin-file`` (default
``<state dir>/server-key.pin``, see :func:`privacy.files.state_dir`; an existing file is
the pin and is only read), and a different key is refused afterwards. ``server-pin-file=""``
keeps the pin in the run's memory only (simulations). Nodes refuse plaintext train and
evaluate messages unless ``require-encryption=false``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from privacy.client_keys import AllowedClients, ClientIdentity, handshake_transcript
from privacy.files import state_dir, write_atomic
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
from strategies.codec import ARRAYS_KEY

HANDSHAKE_TYPE = "query.fedlora_handshake"
SEALED_KEY = "sealed"
HELLO_KEY = "fedlora.hello"
STATE_KEY = "fedlora.ephemeral"
MEMORY_PIN_KEY = "fedlora.server-pin"
SERVER_NODE = 0  # the server's id inside the associated data
REPLY_SLACK = 64 * 1024  # a reply may exceed what was sent by this much (metadata)
SEALED_TYPES = (MessageType.TRAIN, MessageType.EVALUATE)

#: node-config keys read by this module
PIN_KEY = "server-key-pin"
PIN_FILE_KEY = "server-pin-file"
CLIENT_KEY_FILE_KEY = "client-key-file"
REQUIRE_KEY = "require-encryption"
DEFAULT_PIN_FILE = "server-key.pin"


@dataclass
class RoundKeys:
    """The server's keys for one round and message type."""

    ephemeral: EphemeralKey
    sessions: dict[int, SessionKeys] = field(default_factory=dict)
    sent_bytes: dict[int, int] = field(default_factory=dict)
    guard: ReplayGuard | None = None


def _canonical(value: object) -> object:
    """A JSON-able, type-tagged form of a record value (exact for floats and bytes)."""
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, int):
        return ["i", str(value)]
    if isinstance(value, float):
        return ["f", value.hex()]
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, bytes):
        return ["x", value.hex()]
    if isinstance(value, list):
        return ["l", [_canonical(v) for v in value]]
    raise PayloadRejected(f"cannot bind a record value of type {type(value).__name__}")


def clear_binding(message_type: str, content: RecordDict) -> bytes:
    """SHA-256 of what travels in clear beside a sealed payload.

    The message type and every config and metric record except the sealed payload and
    the handshake keys (those are authenticated by the key agreement itself); array
    records other than the sealed one are refused by the caller, never bound.
    """
    skip = (SEALED_KEY, HELLO_KEY)
    doc = {
        "type": message_type,
        "config": {name: {k: _canonical(v) for k, v in record.items()}
                   for name, record in content.config_records.items() if name not in skip},
        "metrics": {name: {k: _canonical(v) for k, v in record.items()}
                    for name, record in content.metric_records.items()},
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).digest()


class EncryptedStrategy(Strategy):
    """Wraps a Flower strategy so adapter payloads travel sealed, end to end.

    Args:
        inner: the strategy that decides what to send and how to aggregate.
        identity: the server's long-term key (its public key is what clients pin).
        allowed_clients: the client keys admitted (None: clients are not authenticated
            at this layer, and a relay could pose as one).
        handshake_timeout: seconds to wait for the handshake replies.

    """

    def __init__(self, inner: Strategy, identity: ServerIdentity | None = None,
                 allowed_clients: AllowedClients | None = None,
                 handshake_timeout: float = 120.0) -> None:
        self.inner = inner
        self.identity = identity or ServerIdentity.generate()
        self.allowed_clients = allowed_clients
        self.handshake_timeout = handshake_timeout
        self.transport_rejections: dict[int, list[tuple[int, str]]] = {}
        self._keys: dict[tuple[int, str], RoundKeys] = {}
        self._run_id = 0

    def summary(self) -> None:
        """Log the wrapped strategy, the server key fingerprint and client authentication."""
        log(INFO, "\t├──> payloads sealed end to end; server key fingerprint %s",
            self.identity.fingerprint())
        if self.allowed_clients is None:
            log(WARNING, "\t├──> clients are not authenticated at the payload layer "
                "(no client-keys-file): a relay could pose as a node")
        else:
            log(INFO, "\t├──> %d client key(s) admitted", len(self.allowed_clients))
        self.inner.summary()

    @property
    def live_keys(self) -> int:
        """How many (round, message type) key sets are held (0 between rounds)."""
        return len(self._keys)

    # ---------------------------------------------------------------- sending

    def _handshake(self, server_round: int, message_type: str, nodes: list[int],
                   grid: Grid) -> RoundKeys:
        keys = self._keys.get((server_round, message_type))
        if keys is None:
            keys = self._keys[(server_round, message_type)] = RoundKeys(EphemeralKey())
            keys.guard = ReplayGuard(run_id=self._run_id, receiver=SERVER_NODE,
                                     round=server_round)
        todo = [n for n in nodes if n not in keys.sessions]
        if not todo:
            return keys
        hello = ConfigRecord({"server-key": self.identity.public_key_bytes,
                              "server-ephemeral": keys.ephemeral.public_key_bytes,
                              "round": server_round, "message-type": message_type})
        queries = [Message(RecordDict({HELLO_KEY: hello}), dst_node_id=n,
                           message_type=HANDSHAKE_TYPE) for n in todo]
        for reply in grid.send_and_receive(queries, timeout=self.handshake_timeout):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise PayloadRejected(f"handshake failed: {reply.error.reason}")
                if node not in todo or node in keys.sessions:
                    raise PayloadRejected("unexpected handshake reply")
                answer = reply.content.config_records[HELLO_KEY]
                client_key = answer["client-ephemeral"]
                if self.allowed_clients is not None:
                    self.allowed_clients.verify(
                        public_key=answer.get("client-key"),
                        signature=answer.get("client-signature"),
                        transcript=handshake_transcript(
                            run_id=self._run_id, round=server_round, message_type=message_type,
                            node_id=node, server_key=self.identity.public_key_bytes,
                            server_ephemeral=keys.ephemeral.public_key_bytes,
                            client_ephemeral=bytes(client_key)), node_id=node)
                keys.sessions[node] = server_session_keys(
                    self.identity, keys.ephemeral, client_public_key=client_key,
                    run_id=self._run_id, round=server_round, client_node=node)
            except (ValueError, KeyError, TypeError) as exc:
                reason = exc.reason if isinstance(exc, PayloadRejected) else str(exc)
                self._reject(server_round, node, f"handshake: {reason}")
        return keys

    def _seal_messages(self, server_round: int, messages: Iterable[Message],
                       grid: Grid) -> list[Message]:
        self._run_id = grid.run.run_id
        messages = list(messages)
        if not messages:
            return []
        by_type: dict[str, list[int]] = {}
        for m in messages:
            by_type.setdefault(m.metadata.message_type, []).append(m.metadata.dst_node_id)
        keysets = {kind: self._handshake(server_round, kind, nodes, grid)
                   for kind, nodes in by_type.items()}
        sealed = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            keys = keysets[kind]
            if node not in keys.sessions:
                continue  # no handshake: the node is left out of this round
            content = message.content
            new = RecordDict({k: v for k, v in content.items() if k != ARRAYS_KEY})
            payload = seal_arrays(content.array_records.get(ARRAYS_KEY, ArrayRecord()),
                                  key=keys.sessions[node].send,
                                  context=PayloadContext(self._run_id, server_round,
                                                         SERVER_NODE, node,
                                                         clear_binding(kind, new)))
            keys.sent_bytes[node] = max(keys.sent_bytes.get(node, 0), len(payload.ciphertext))
            new[SEALED_KEY] = payload.to_record()
            new[HELLO_KEY] = ConfigRecord({
                "server-key": self.identity.public_key_bytes,
                "server-ephemeral": keys.ephemeral.public_key_bytes})
            sealed.append(Message(new, dst_node_id=node, message_type=kind))
        return sealed

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's messages, with their arrays sealed per node."""
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        return self._seal_messages(server_round, messages, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Evaluation messages, sealed like training ones (under their own keys)."""
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._seal_messages(server_round, messages, grid)

    # -------------------------------------------------------------- receiving

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        self.transport_rejections.setdefault(server_round, []).append((node, reason))
        log(WARNING, "round %d: rejected message from node %d: %s", server_round, node, reason)

    def _open_one(self, server_round: int, kind: str, keys: RoundKeys | None,
                  reply: Message) -> Message:
        node = reply.metadata.src_node_id
        if keys is None or node not in keys.sessions:
            raise PayloadRejected("reply from a node without keys for this round")
        if reply.metadata.message_type != kind:
            raise PayloadRejected(f"a {reply.metadata.message_type} reply where a {kind} "
                                  "reply was expected")
        content = reply.content
        if SEALED_KEY not in content.config_records:
            raise PayloadRejected("plaintext reply while payload encryption is on")
        if content.array_records:
            raise PayloadRejected("a sealed reply must not carry arrays in clear")
        payload = SealedPayload.from_record(content.config_records[SEALED_KEY])
        plain = RecordDict({k: v for k, v in content.items()
                            if k not in (SEALED_KEY, HELLO_KEY)})
        arrays = open_sealed(
            payload, key=keys.sessions[node].receive,
            context=PayloadContext(self._run_id, server_round, node, SERVER_NODE,
                                   clear_binding(kind, plain)),
            max_bytes=keys.sent_bytes.get(node, 0) + REPLY_SLACK, guard=keys.guard)
        if arrays:
            plain[ARRAYS_KEY] = _to_record(arrays)
        reply.content = plain
        return reply

    def _open_replies(self, server_round: int, kind: str,
                      replies: Iterable[Message]) -> Iterator[Message]:
        """Open each sealed reply as it arrives (a generator: replies are not collected)."""
        keys = self._keys.get((server_round, kind))
        for reply in replies:
            if reply.has_error():
                yield reply
                continue
            try:
                opened = self._open_one(server_round, kind, keys, reply)
            except PayloadRejected as exc:
                self._reject(server_round, reply.metadata.src_node_id, exc.reason)
                continue
            except Exception as exc:  # noqa: BLE001 - never crash on a malformed reply
                self._reject(server_round, reply.metadata.src_node_id,
                             f"malformed sealed reply ({exc})")
                continue
            yield opened

    def _drop_keys(self, server_round: int, kind: str) -> None:
        """Forget a round's keys for one message type, and any older ones left behind."""
        for key in [k for k in self._keys if k[0] < server_round or k == (server_round, kind)]:
            del self._keys[key]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Open every sealed reply, let the wrapped strategy aggregate, drop the keys."""
        try:
            return self.inner.aggregate_train(
                server_round, self._open_replies(server_round, MessageType.TRAIN, replies))
        finally:
            self._drop_keys(server_round, MessageType.TRAIN)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Open (authenticate) every evaluation reply, aggregate, drop the keys."""
        try:
            return self.inner.aggregate_evaluate(
                server_round, self._open_replies(server_round, MessageType.EVALUATE, replies))
        finally:
            self._drop_keys(server_round, MessageType.EVALUATE)


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


# ------------------------------------------------------------------------ client side


def _flag(value: object) -> bool:
    """A node-config boolean (Flower passes ``true``/``false`` as bools or strings)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def handshake(message: Message, context: Context) -> Message:
    """Answer the server's handshake: a fresh ephemeral key, signed if the node has a key."""
    hello = message.content.config_records[HELLO_KEY]
    server_key = hello["server-key"]
    kind = str(hello.get("message-type", ""))
    if kind not in SEALED_TYPES:
        raise PayloadRejected(f"handshake for an unknown message type {kind!r}")
    try:
        verify_pinned(server_key, trusted_pin(server_key, context))
    except ValueError as exc:
        raise PayloadRejected(f"untrusted server: {exc}") from None
    ephemeral = EphemeralKey()
    server_round = int(hello["round"])
    context.state[f"{STATE_KEY}.{kind}"] = ConfigRecord({
        "round": server_round, "private": ephemeral.private_bytes(),
        "server-key": server_key})
    reply = ConfigRecord({"client-ephemeral": ephemeral.public_key_bytes})
    key_file = str(context.node_config.get(CLIENT_KEY_FILE_KEY, "") or "")
    if key_file:
        identity = ClientIdentity.load(Path(key_file).expanduser())
        reply["client-key"] = identity.public_key_bytes
        reply["client-signature"] = identity.sign(handshake_transcript(
            run_id=message.metadata.run_id, round=server_round, message_type=kind,
            node_id=context.node_id, server_key=server_key,
            server_ephemeral=hello["server-ephemeral"],
            client_ephemeral=ephemeral.public_key_bytes))
    return Message(RecordDict({HELLO_KEY: reply}), reply_to=message)


def pin_file(context: Context) -> Path | None:
    """Where this node keeps its first-use pin (None: in the run's memory only)."""
    value = context.node_config.get(PIN_FILE_KEY)
    if value is None:
        return state_dir() / DEFAULT_PIN_FILE
    return Path(str(value)).expanduser() if str(value) else None


def trusted_pin(server_key: bytes, context: Context) -> str:
    """The pin to check ``server_key`` against.

    ``server-key-pin`` if configured; else the pin recorded on first use (in
    ``server-pin-file``, or in the run's state), recording ``server_key`` if there is none.
    """
    configured = str(context.node_config.get(PIN_KEY, "") or "")
    if configured:
        return configured
    path = pin_file(context)
    if path is None:
        record = context.state.config_records.get(MEMORY_PIN_KEY)
        if record is None:
            context.state[MEMORY_PIN_KEY] = ConfigRecord({"pin": fingerprint(server_key)})
            return fingerprint(server_key)
        return str(record["pin"])
    if path.exists():
        pinned = path.read_text().strip()
        if pinned and pinned != fingerprint(server_key):
            raise PayloadRejected(
                f"the server key changed: this node pinned {pinned} in {path} on first use, "
                f"the server now presents {fingerprint(server_key)}; if the server's key was "
                f"replaced on purpose, delete {path} or set --node-config "
                f"{PIN_KEY}=<new fingerprint>")
        return pinned
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (fingerprint(server_key) + "\n").encode(), 0o600)
    log(INFO, "pinned the server key %s in %s (trust on first use)", fingerprint(server_key),
        path)
    return fingerprint(server_key)


def _session(message: Message, context: Context, server_round: int, kind: str) -> SessionKeys:
    state = context.state.config_records.get(f"{STATE_KEY}.{kind}")
    if state is None or int(state["round"]) != server_round:
        raise PayloadRejected(f"no {kind} handshake for round {server_round}")
    hello = message.content.config_records[HELLO_KEY]
    if hello["server-key"] != state["server-key"]:
        raise PayloadRejected("server key changed within the round")
    return client_session_keys(
        EphemeralKey.from_private_bytes(state["private"]),
        server_public_key=hello["server-key"], server_ephemeral_key=hello["server-ephemeral"],
        pin=trusted_pin(hello["server-key"], context), run_id=message.metadata.run_id,
        round=server_round, client_node=context.node_id)


def encryption_mod(message: Message, context: Context,
                   call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: open sealed payloads before the handler, seal the reply.

    Plaintext train and evaluate messages are refused unless the node config sets
    ``require-encryption=false``. The round's ephemeral key is dropped once the reply is
    sealed (or the handler fails).
    """
    content = message.content if message.has_content() else None
    kind = message.metadata.message_type
    if content is None or SEALED_KEY not in content.config_records:
        if content is not None and (kind in SEALED_TYPES or ARRAYS_KEY in content.array_records) \
                and _flag(context.node_config.get(REQUIRE_KEY, True)):
            raise PayloadRejected("plaintext payload refused: this node requires encryption "
                                  "(require-encryption=true, the default)")
        return call_next(message, context)
    if kind not in SEALED_TYPES:
        raise PayloadRejected(f"a sealed payload in a {kind!r} message")
    if content.array_records:
        raise PayloadRejected("a sealed message must not carry arrays in clear")
    try:
        payload = SealedPayload.from_record(content.config_records[SEALED_KEY])
        keys = _session(message, context, payload.round, kind)
        plain = RecordDict({k: v for k, v in content.items()
                            if k not in (SEALED_KEY, HELLO_KEY)})
        arrays = open_sealed(payload, key=keys.receive,
                             context=PayloadContext(message.metadata.run_id, payload.round,
                                                    SERVER_NODE, context.node_id,
                                                    clear_binding(kind, plain)),
                             max_bytes=len(payload.ciphertext))
        plain[ARRAYS_KEY] = _to_record(arrays)
        message.content = plain
        reply = call_next(message, context)
        if not reply.has_content():
            return reply
        arrays_out = reply.content.array_records.get(ARRAYS_KEY, ArrayRecord())
        out = RecordDict({k: v for k, v in reply.content.items() if k != ARRAYS_KEY})
        if out.array_records:
            raise PayloadRejected("a reply may carry arrays only under 'arrays'")
        sealed = seal_arrays(arrays_out, key=keys.send,
                             context=PayloadContext(message.metadata.run_id, payload.round,
                                                    context.node_id, SERVER_NODE,
                                                    clear_binding(kind, out)))
        out[SEALED_KEY] = sealed.to_record()
        reply.content = out
        return reply
    finally:
        context.state.config_records.pop(f"{STATE_KEY}.{kind}", None)
