"""End-to-end sealing of adapter payloads between the ServerApp and its ClientApps.

Why one module of about 700 lines: it is one cryptographic protocol (key agreement, key
derivation, nonces, sealing, the manifest and its parser); a security review reads it
whole, and splitting it would scatter the invariants that hold it together.

Messages pass through the SuperLink, which stores them; this module makes sure it only
ever stores ciphertext. Protocol ``fedlora-payload/v2``:

**Keys.** The server has a long-term X25519 key ``S`` (:class:`privacy.keys.ServerIdentity`),
pinned by every client. Each round the server draws an ephemeral key ``Es`` (one for all
clients) and each client an ephemeral key ``Ec``; the public halves travel in clear in the
message config. Both sides compute::

    ikm  = X25519(ec, S) || X25519(ec, Es)          # = X25519(s, Ec) || X25519(es, Ec)
    salt = SHA-256(b"fedlora-payload/v2|salt|" || S || Es || Ec)
    info = b"fedlora-payload/v2|run=<run>|round=<round>|client=<node>|dir=<s2c or c2s>"
    key  = HKDF-SHA256(ikm, salt, info, length=32)   # one AES-256 key per direction

``X25519(ec, S)`` authenticates the server: only the holder of the pinned static key can
compute it, so only the pinned server can read what a client seals, and a client can open
only what the pinned server sealed (a relay that swaps ``Es`` or ``S`` learns nothing and
makes decryption fail). ``X25519(ec, Es)`` gives forward secrecy: the ephemeral keys are
dropped after the round, so a later leak of ``s`` does not open recorded traffic. The salt
binds the key to the exact three public keys (the transcript); ``info`` binds it to the
protocol version, run, round, client node and direction, so every round, every client
and each direction has its own key, and the two directions never share a key or nonces.
The server side is authenticated by the key exchange; the client side by a signature: a
node signs its ephemeral key, bound to run, round, message type and node id, with a
long-term Ed25519 key the server admits (:mod:`privacy.client_keys`, checked in
:mod:`privacy.flower`).

**Sealing.** AES-256-GCM over the arrays' raw little-endian C-order bytes, concatenated in
manifest order (no pickle, no ``.npy``: nothing self-describing is parsed on receipt). The
manifest is a compact JSON list ``[[name, shape, dtype], ...]`` sorted by name, sent in
clear. The associated data is::

    b"fedlora-payload/v2" || u16 version || u64 run || u64 round || u64 sender
        || u64 receiver || SHA-256(manifest as sent, UTF-8) || SHA-256(binding)
                                                          # integers big-endian

``binding`` is whatever travels in clear beside the payload and must not be changed on
the way: :mod:`privacy.flower` passes a digest of the message type and of every config
and metric record of the message (the instructions, the reported example count).

**Nonces.** 96 bits = a 32-bit big-endian per-key counter || 64 fresh random bits. Within
one key object nonces are distinct by construction (the counter never repeats, and the
key refuses a 2**32+1-th encryption); should the same key ever be derived twice (state
restored, a retry), the random half still makes a repeat a 2**-64 event per pair of
nonces, where a bare counter would repeat at once. Only the sending side of a direction
can encrypt (receiving keys refuse to).

**Opening** checks, before any decryption: the ciphertext size against ``max_bytes``, the
version, run, round, sender and receiver against what the receiver expects, the replay
guard, the manifest (syntax, dtype allow-list, the expected manifest if given) and that
the ciphertext length is exactly what the manifest implies. Any failure raises
:class:`PayloadRejected`; no ``cryptography`` exception escapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import Array, ArrayRecord, ConfigRecord

from privacy.keys import PinMismatch, ServerIdentity, verify_pinned

PROTOCOL = b"fedlora-payload/v2"
VERSION = 2
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_ENCRYPTIONS = 2**32
MAX_MANIFEST_CHARS = 1 << 20
MAX_NDIM = 32
ALLOWED_DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
})
_UINT64_MAX = 2**64 - 1
_COUNTER_BYTES = 4
_RECORD_FIELDS = {
    "version": int, "run-id": int, "round": int, "sender": int, "receiver": int,
    "nonce": bytes, "ciphertext": bytes, "manifest": str,
}

Direction = Literal["s2c", "c2s"]
ManifestEntry = tuple[str, tuple[int, ...], str]
Manifest = tuple[ManifestEntry, ...]


class PayloadRejected(ValueError):
    """A payload that must not be used (or cannot be sealed); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_uint64(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise PayloadRejected(f"{name} must be an integer in [0, 2**64), got {value!r}")
    return value


@dataclass(frozen=True)
class PayloadContext:
    """Who sends a payload to whom, in which run and round (all unsigned 64-bit ints).

    ``binding``: bytes that travel in clear beside the payload (or their digest), bound
    into the associated data so that changing them makes the payload fail to open.
    """

    run_id: int
    round: int
    sender: int
    receiver: int
    binding: bytes = b""

    def __post_init__(self) -> None:
        for name in ("run_id", "round", "sender", "receiver"):
            _check_uint64(name, getattr(self, name))
        if not isinstance(self.binding, bytes):
            raise PayloadRejected("binding must be bytes")


# --------------------------------------------------------------------------- nonces


class NonceSequence:
    """96-bit AES-GCM nonces: 32-bit big-endian counter || 64 random bits.

    Distinct within one sequence by construction; refuses to issue more than ``limit``.
    """

    def __init__(self, limit: int = MAX_ENCRYPTIONS) -> None:
        if not 0 < limit <= MAX_ENCRYPTIONS:
            raise ValueError(f"limit must be in (0, 2**32], got {limit}")
        self._limit = limit
        self._count = 0
        self._lock = threading.Lock()

    @property
    def issued(self) -> int:
        """How many nonces this sequence has handed out."""
        return self._count

    def next(self) -> bytes:
        """The next nonce.

        Raises:
            PayloadRejected: the sequence is exhausted (the key must not be used again).

        """
        with self._lock:
            if self._count >= self._limit:
                raise PayloadRejected(
                    f"key exhausted: it has sealed {self._count} payloads, the limit"
                )
            counter = self._count
            self._count += 1
        return counter.to_bytes(_COUNTER_BYTES, "big") + os.urandom(NONCE_BYTES - _COUNTER_BYTES)


# --------------------------------------------------------------------------- keys


class SessionKey:
    """An AES-256-GCM key for one direction of one client's exchange in one round.

    Obtained from :func:`server_session_keys` or :func:`client_session_keys`; only the
    sending side of a direction may seal with it.
    """

    def __init__(self, key: bytes, *, direction: Direction, run_id: int, round: int,
                 client_node: int, can_seal: bool) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an AES-256 key is {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self._key_id = hashlib.sha256(PROTOCOL + b"|key-id|" + key).hexdigest()[:16]
        self._nonces = NonceSequence() if can_seal else None
        self.direction: Direction = direction
        self.run_id = run_id
        self.round = round
        self.client_node = client_node

    def __repr__(self) -> str:
        return (f"SessionKey(id={self._key_id}, {self.direction}, run={self.run_id}, "
                f"round={self.round}, client={self.client_node}, can_seal={self.can_seal})")

    @property
    def key_id(self) -> str:
        """A one-way identifier of the key (first 16 hex of a hash), safe to log."""
        return self._key_id

    @property
    def can_seal(self) -> bool:
        """Whether this is the sending side's key (the only one allowed to encrypt)."""
        return self._nonces is not None

    def check_context(self, context: PayloadContext) -> None:
        """Raise :class:`PayloadRejected` unless ``context`` is what this key was made for."""
        if (context.run_id, context.round) != (self.run_id, self.round):
            raise PayloadRejected(
                f"key is for run {self.run_id} round {self.round}, not run "
                f"{context.run_id} round {context.round}"
            )
        node = context.sender if self.direction == "c2s" else context.receiver
        if node != self.client_node:
            role = "sender" if self.direction == "c2s" else "receiver"
            raise PayloadRejected(
                f"{self.direction} key belongs to client {self.client_node}, but the "
                f"{role} is node {node}"
            )

    def _encrypt(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        if self._nonces is None:
            raise PayloadRejected(f"the {self.direction} key on this side can only open")
        nonce = self._nonces.next()
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def _decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytearray:
        out = bytearray(len(ciphertext) - TAG_BYTES)
        try:
            if hasattr(self._aead, "decrypt_into"):  # cryptography >= 45: no extra copy
                self._aead.decrypt_into(nonce, ciphertext, aad, out)
            else:
                out[:] = self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise PayloadRejected("authentication failed") from None
        except Exception as exc:  # any other cryptography error: never let it escape
            raise PayloadRejected(f"decryption failed: {type(exc).__name__}") from None
        return out


@dataclass(frozen=True)
class SessionKeys:
    """One party's two keys for a round: ``send`` seals, ``receive`` opens."""

    send: SessionKey
    receive: SessionKey


class EphemeralKey:
    """A per-round X25519 key pair. Use once, for one round, then drop it."""

    def __init__(self, private_key: X25519PrivateKey | None = None) -> None:
        self._private_key = private_key or X25519PrivateKey.generate()
        self.public_key_bytes: bytes = self._private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> EphemeralKey:
        """Restore a key kept between two invocations of the same round (node-local state)."""
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise PayloadRejected("an X25519 private key is 32 bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """The 32 raw private bytes, to keep in node-local state (never send them)."""
        return self._private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def exchange(self, peer_public_key: bytes) -> bytes:
        """X25519 with a peer's raw public key; bad or low-order keys are rejected."""
        return _exchange(self._exchange_raw, peer_public_key)

    def _exchange_raw(self, peer_public_key: bytes) -> bytes:
        return self._private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))


def _exchange(exchange: Callable[[bytes], bytes], peer_public_key: object) -> bytes:
    """Run an X25519 exchange on raw peer bytes; every failure is a PayloadRejected."""
    if not isinstance(peer_public_key, bytes) or len(peer_public_key) != KEY_BYTES:
        raise PayloadRejected("a peer public key must be 32 bytes")
    try:
        return exchange(peer_public_key)
    except Exception:  # low-order point (all-zero secret) or malformed key
        raise PayloadRejected("key agreement failed: invalid or low-order public key") from None


def _derive_keys(ikm: bytes, *, static: bytes, server_eph: bytes, client_eph: bytes,
                 run_id: int, round: int, client_node: int) -> dict[Direction, bytes]:
    """Both directions' AES keys (see the module docstring for the exact inputs)."""
    for name, value in (("run_id", run_id), ("round", round), ("client_node", client_node)):
        _check_uint64(name, value)
    salt = hashlib.sha256(PROTOCOL + b"|salt|" + static + server_eph + client_eph).digest()
    keys: dict[Direction, bytes] = {}
    for direction in ("s2c", "c2s"):
        info = b"%s|run=%d|round=%d|client=%d|dir=%s" % (
            PROTOCOL, run_id, round, client_node, direction.encode())
        keys[direction] = HKDF(hashes.SHA256(), KEY_BYTES, salt, info).derive(ikm)
    return keys


def server_session_keys(identity: ServerIdentity, ephemeral: EphemeralKey, *,
                        client_public_key: bytes, run_id: int, round: int,
                        client_node: int) -> SessionKeys:
    """The server's keys with one client for one round.

    Args:
        identity: the server's long-term key.
        ephemeral: the server's ephemeral key for this round (shared by all clients).
        client_public_key: the client's ephemeral public key for this round.
        run_id: the Flower run.
        round: the server round.
        client_node: the client's node id.

    Returns:
        ``send`` (server to client) and ``receive`` (client to server).

    """
    ikm = _exchange(identity.exchange, client_public_key) + ephemeral.exchange(client_public_key)
    keys = _derive_keys(ikm, static=identity.public_key_bytes,
                        server_eph=ephemeral.public_key_bytes, client_eph=client_public_key,
                        run_id=run_id, round=round, client_node=client_node)
    common = dict(run_id=run_id, round=round, client_node=client_node)
    return SessionKeys(send=SessionKey(keys["s2c"], direction="s2c", can_seal=True, **common),
                       receive=SessionKey(keys["c2s"], direction="c2s", can_seal=False, **common))


def client_session_keys(ephemeral: EphemeralKey, *, server_public_key: bytes,
                        server_ephemeral_key: bytes, pin: str, run_id: int, round: int,
                        client_node: int) -> SessionKeys:
    """A client's keys with the pinned server for one round.

    Args:
        ephemeral: this client's ephemeral key for this round.
        server_public_key: the server's long-term public key as received (checked
            against ``pin`` before use).
        server_ephemeral_key: the server's ephemeral public key for this round.
        pin: the server's public key or fingerprint, in hex, configured out of band.
        run_id: the Flower run.
        round: the server round.
        client_node: this client's node id.

    Returns:
        ``send`` (client to server) and ``receive`` (server to client).

    Raises:
        PayloadRejected: the server key does not match the pin, or a key is invalid.

    """
    try:
        verify_pinned(server_public_key, pin)
    except PinMismatch as exc:
        raise PayloadRejected(f"untrusted server: {exc}") from None
    except ValueError as exc:
        raise PayloadRejected(f"cannot check the server key: {exc}") from None
    ikm = ephemeral.exchange(server_public_key) + ephemeral.exchange(server_ephemeral_key)
    keys = _derive_keys(ikm, static=server_public_key, server_eph=server_ephemeral_key,
                        client_eph=ephemeral.public_key_bytes, run_id=run_id, round=round,
                        client_node=client_node)
    common = dict(run_id=run_id, round=round, client_node=client_node)
    return SessionKeys(send=SessionKey(keys["c2s"], direction="c2s", can_seal=True, **common),
                       receive=SessionKey(keys["s2c"], direction="s2c", can_seal=False, **common))


# --------------------------------------------------------------------------- manifest


def manifest_of(arrays: Mapping[str, np.ndarray] | ArrayRecord) -> Manifest:
    """The manifest ``((name, shape, dtype), ...)``, sorted by name, of some arrays.

    Works on numpy arrays and on Flower ``Array``s (from their header, nothing decoded).
    """
    if not isinstance(arrays, Mapping | ArrayRecord):
        raise PayloadRejected(f"expected a dict of arrays or an ArrayRecord, got {type(arrays)}")
    try:
        entries = [(name, tuple(int(d) for d in a.shape), np.dtype(a.dtype).name)
                   for name, a in arrays.items()]
    except (AttributeError, TypeError, ValueError) as exc:
        raise PayloadRejected(f"cannot describe the arrays: {exc}") from None
    return tuple(sorted(entries))


def _canonical_arrays(arrays: Mapping[str, Any] | ArrayRecord) -> list[tuple[str, np.ndarray]]:
    """Sorted (name, little-endian C-contiguous array); rejects what cannot be sealed."""
    if not isinstance(arrays, Mapping | ArrayRecord):
        raise PayloadRejected(f"expected a dict of arrays or an ArrayRecord, got {type(arrays)}")
    out = []
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise PayloadRejected(f"array names must be str, got {type(name).__name__}")
        if isinstance(value, Array):
            value = value.numpy()
        if not isinstance(value, np.ndarray):
            raise PayloadRejected(f"{name}: expected a numpy array, got {type(value).__name__}")
        if value.dtype.name not in ALLOWED_DTYPES:
            raise PayloadRejected(f"{name}: dtype {value.dtype} is not allowed")
        if value.ndim > MAX_NDIM:
            raise PayloadRejected(f"{name}: {value.ndim} dimensions, at most {MAX_NDIM}")
        little = value.dtype.newbyteorder("<")
        out.append((name, np.asarray(value, dtype=little, order="C")))  # keeps 0-d arrays
    return sorted(out, key=lambda item: item[0])


def _manifest_json(manifest: Manifest) -> str:
    return json.dumps([[n, list(s), d] for n, s, d in manifest], separators=(",", ":"))


def _reject_constant(token: str) -> None:
    raise ValueError(f"unexpected JSON token {token}")


def _parse_manifest(text: object) -> Manifest:
    """Strictly parse a received manifest, or raise :class:`PayloadRejected`."""
    if not isinstance(text, str) or len(text) > MAX_MANIFEST_CHARS:
        raise PayloadRejected(f"manifest must be a string of at most {MAX_MANIFEST_CHARS} chars")
    try:
        raw = json.loads(text, parse_float=_reject_constant, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PayloadRejected(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise PayloadRejected("manifest must be a JSON list")
    manifest = tuple(_parse_entry(entry) for entry in raw)
    names = [name for name, _, _ in manifest]
    if any(a >= b for a, b in zip(names, names[1:], strict=False)):
        raise PayloadRejected("manifest names must be unique and sorted")
    return manifest


def _parse_entry(entry: object) -> ManifestEntry:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise PayloadRejected("manifest entries must be [name, shape, dtype]")
    name, shape, dtype = entry
    if not isinstance(name, str):
        raise PayloadRejected("manifest names must be strings")
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise PayloadRejected(f"manifest entry {name!r}: shape must be non-negative ints")
    if dtype not in ALLOWED_DTYPES:
        raise PayloadRejected(f"manifest entry {name!r}: dtype {dtype!r} is not allowed")
    return name, tuple(shape), dtype


def _normalise_manifest(manifest: Iterable[Any] | Mapping[str, Any] | ArrayRecord) -> Manifest:
    if isinstance(manifest, Mapping | ArrayRecord):
        return manifest_of(manifest)
    entries: Iterable[Any] = manifest
    try:
        return tuple(sorted((str(n), tuple(int(d) for d in s), str(t)) for n, s, t in entries))
    except (TypeError, ValueError) as exc:
        raise PayloadRejected(f"expected_manifest is malformed: {exc}") from None


def _manifest_nbytes(manifest: Manifest) -> int:
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in manifest)


def _manifest_difference(got: Manifest, want: Manifest) -> str:
    got_map = {n: (s, d) for n, s, d in got}
    want_map = {n: (s, d) for n, s, d in want}
    missing = sorted(set(want_map) - set(got_map))
    extra = sorted(set(got_map) - set(want_map))
    changed = sorted(n for n in set(got_map) & set(want_map) if got_map[n] != want_map[n])
    parts = [f"missing {missing[:3]}" if missing else "",
             f"unexpected {extra[:3]}" if extra else "",
             f"{changed[0]} is {got_map[changed[0]]}, expected {want_map[changed[0]]}"
             if changed else ""]
    return "manifest differs from the expected one: " + "; ".join(p for p in parts if p)


# --------------------------------------------------------------------------- payload


@dataclass(frozen=True)
class SealedPayload:
    """An encrypted set of arrays plus the clear header needed to open it."""

    version: int
    run_id: int
    round: int
    sender: int
    receiver: int
    nonce: bytes
    ciphertext: bytes
    manifest: str

    def to_record(self) -> ConfigRecord:
        """A Flower ``ConfigRecord`` (ints, bytes and one str) carrying this payload."""
        return ConfigRecord({
            "version": self.version, "run-id": self.run_id, "round": self.round,
            "sender": self.sender, "receiver": self.receiver, "nonce": self.nonce,
            "ciphertext": self.ciphertext, "manifest": self.manifest,
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SealedPayload:
        """Parse a record built by :meth:`to_record`; strict about keys and types."""
        if not isinstance(record, ConfigRecord | Mapping):
            raise PayloadRejected(f"expected a ConfigRecord, got {type(record).__name__}")
        keys = set(record.keys())
        if keys != set(_RECORD_FIELDS):
            raise PayloadRejected(
                f"sealed record keys: missing {sorted(set(_RECORD_FIELDS) - keys)}, "
                f"unexpected {sorted(keys - set(_RECORD_FIELDS))}"
            )
        fields: dict[str, Any] = dict(record)
        for key, kind in _RECORD_FIELDS.items():
            value = fields[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise PayloadRejected(f"sealed record field {key!r} must be {kind.__name__}")
            if kind is int:
                _check_uint64(key, value)
        return cls(version=fields["version"], run_id=fields["run-id"], round=fields["round"],
                   sender=fields["sender"], receiver=fields["receiver"],
                   nonce=fields["nonce"], ciphertext=fields["ciphertext"],
                   manifest=fields["manifest"])


def _associated_data(context: PayloadContext, manifest: str) -> bytes:
    header = struct.pack(">HQQQQ", VERSION, context.run_id, context.round,
                         context.sender, context.receiver)
    return (PROTOCOL + header + hashlib.sha256(manifest.encode("utf-8")).digest()
            + hashlib.sha256(context.binding).digest())


def _seal_plaintext(plaintext: bytes, manifest: str, *, key: SessionKey,
                    context: PayloadContext) -> SealedPayload:
    """Encrypt prepared plaintext under ``key`` (the layer under :func:`seal_arrays`)."""
    key.check_context(context)
    nonce, ciphertext = key._encrypt(plaintext, _associated_data(context, manifest))
    return SealedPayload(VERSION, context.run_id, context.round, context.sender,
                         context.receiver, nonce, ciphertext, manifest)


def seal_arrays(arrays: Mapping[str, np.ndarray] | ArrayRecord, *, key: SessionKey,
                context: PayloadContext) -> SealedPayload:
    """Encrypt arrays for ``context.receiver``.

    Args:
        arrays: name -> array (numpy arrays or Flower ``Array``s in an ``ArrayRecord``);
            dtypes from :data:`ALLOWED_DTYPES` only.
        key: the sending side's :class:`SessionKey` for this round and client.
        context: run, round, sender and receiver (bound into the associated data).

    Returns:
        The sealed payload; ``.to_record()`` puts it in a message.

    Raises:
        PayloadRejected: a dtype is not allowed, the key cannot seal, does not fit the
            context, or is exhausted.

    """
    named = _canonical_arrays(arrays)
    manifest = _manifest_json(tuple((n, tuple(a.shape), a.dtype.name) for n, a in named))
    plaintext = b"".join(a.data for _, a in named if a.size)  # C-contiguous buffers
    return _seal_plaintext(plaintext, manifest, key=key, context=context)


def _check_header(payload: SealedPayload, context: PayloadContext) -> None:
    if payload.version != VERSION:
        raise PayloadRejected(f"unsupported version {payload.version} (expected {VERSION})")
    if payload.run_id != context.run_id:
        raise PayloadRejected(f"wrong run: payload is for run {payload.run_id}, "
                              f"this is run {context.run_id}")
    if payload.round != context.round:
        raise PayloadRejected(f"wrong round: payload is for round {payload.round}, "
                              f"this is round {context.round}")
    if payload.receiver != context.receiver:
        raise PayloadRejected(f"addressed to node {payload.receiver}, not {context.receiver}")
    if payload.sender != context.sender:
        raise PayloadRejected(f"sent by node {payload.sender}, expected {context.sender}")
    if not isinstance(payload.nonce, bytes) or len(payload.nonce) != NONCE_BYTES:
        raise PayloadRejected(f"nonce must be {NONCE_BYTES} bytes")


def _decode(plaintext: bytearray, manifest: Manifest) -> dict[str, np.ndarray]:
    """Views of the (writable) plaintext buffer, one per manifest entry."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, dtype in manifest:
        wire = np.dtype(dtype).newbyteorder("<")
        count = math.prod(shape)
        flat = np.frombuffer(plaintext, dtype=wire, count=count, offset=offset) if count \
            else np.empty(0, dtype=wire)
        offset += count * wire.itemsize
        out[name] = flat.reshape(shape).astype(wire.newbyteorder("="), copy=False)
    return out


def open_sealed(payload: SealedPayload, *, key: SessionKey, context: PayloadContext,
                max_bytes: int,
                expected_manifest: Iterable[Any] | Mapping[str, Any] | ArrayRecord | None = None,
                guard: ReplayGuard | None = None) -> dict[str, np.ndarray]:
    """Check, authenticate and decrypt a payload addressed to this side.

    Args:
        payload: as received (``SealedPayload.from_record(record)``).
        key: the receiving side's :class:`SessionKey` for this round and sender.
        context: what the receiver expects: run, round, sender and itself as receiver.
        max_bytes: larger ciphertexts are rejected before anything else is done.
        expected_manifest: if given, what the payload must carry exactly: ``(name, shape,
            dtype)`` entries (e.g. from :func:`manifest_of`) or example arrays.
        guard: a :class:`ReplayGuard`; the payload is recorded once it authenticates.

    Returns:
        name -> array, exactly as sealed.

    Raises:
        PayloadRejected: for every failure, with the reason.

    """
    if not isinstance(payload, SealedPayload):
        raise PayloadRejected(f"expected a SealedPayload, got {type(payload).__name__}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise PayloadRejected(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    if not isinstance(payload.ciphertext, bytes):
        raise PayloadRejected("ciphertext must be bytes")
    if len(payload.ciphertext) > max_bytes:
        raise PayloadRejected(f"payload of {len(payload.ciphertext)} bytes exceeds {max_bytes}")
    _check_header(payload, context)
    key.check_context(context)
    if guard is not None:
        guard.check(payload)
    manifest = _parse_manifest(payload.manifest)
    if expected_manifest is not None:
        want = _normalise_manifest(expected_manifest)
        if manifest != want:
            raise PayloadRejected(_manifest_difference(manifest, want))
    expected_len = _manifest_nbytes(manifest) + TAG_BYTES
    if len(payload.ciphertext) != expected_len:
        raise PayloadRejected(f"ciphertext of {len(payload.ciphertext)} bytes does not match "
                              f"the manifest ({expected_len} expected)")
    plaintext = key._decrypt(payload.nonce, payload.ciphertext,
                             _associated_data(context, payload.manifest))
    arrays = _decode(plaintext, manifest)
    if guard is not None:
        guard.remember(payload)
    return arrays


# --------------------------------------------------------------------------- replay


class ReplayGuard:
    """Accept each authenticated message once, for one receiver in one run, round by round.

    A message is identified by ``(sender, nonce)``: a nonce cannot be changed without
    failing authentication, and a sender never reuses one under its round key. The guard
    forgets a round when the next begins; messages for any other round are rejected.
    """

    def __init__(self, *, run_id: int, receiver: int, round: int) -> None:
        self.run_id = _check_uint64("run_id", run_id)
        self.receiver = _check_uint64("receiver", receiver)
        self._round = _check_uint64("round", round)
        self._seen: set[tuple[int, bytes]] = set()
        self._lock = threading.Lock()

    @property
    def round(self) -> int:
        """The round whose messages are accepted now."""
        return self._round

    def begin_round(self, round: int) -> None:
        """Move to ``round`` (never backwards), forgetting the previous round's messages."""
        _check_uint64("round", round)
        with self._lock:
            if round < self._round:
                raise PayloadRejected(f"round {round} is before the current round {self._round}")
            if round != self._round:
                self._round, self._seen = round, set()

    def check(self, payload: SealedPayload) -> None:
        """Reject a payload for another run, round or receiver, or one already accepted."""
        with self._lock:
            self._check_locked(payload)

    def remember(self, payload: SealedPayload) -> None:
        """Record an authenticated payload as accepted (rejecting it if it already was)."""
        with self._lock:
            self._check_locked(payload)
            self._seen.add((payload.sender, payload.nonce))

    def _check_locked(self, payload: SealedPayload) -> None:
        if payload.run_id != self.run_id:
            raise PayloadRejected(f"replay: payload is for run {payload.run_id}, "
                                  f"not {self.run_id}")
        if payload.round != self._round:
            raise PayloadRejected(f"replay: wrong round {payload.round}, "
                                  f"the current round is {self._round}")
        if payload.receiver != self.receiver:
            raise PayloadRejected(f"addressed to node {payload.receiver}, not {self.receiver}")
        if (payload.sender, payload.nonce) in self._seen:
            raise PayloadRejected(f"replay: message {payload.nonce.hex()} from node "
                                  f"{payload.sender} was already accepted in round {self._round}")
