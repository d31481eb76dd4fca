"""Client identities for the payload layer: Ed25519 keys that sign each handshake.

Each node holds a long-term Ed25519 key (:class:`ClientIdentity`, node config
``client-key-file``). In every handshake it signs its fresh ephemeral key together with
the run, the round, the message type, its node id and the server's two public keys
(:func:`handshake_transcript`). The server keeps the set of public keys it admits
(:class:`AllowedClients`, run config ``client-keys-file``, written by ``fedlora certs``)
and refuses a handshake that is unsigned, signed by a key it does not know, badly signed,
or signed by a key that already speaks for another node in the run. A relay that swaps a
client's ephemeral key can then neither read the adapter sent to that node nor seal an
update in its name.

Key files: the private key is PKCS#8 PEM, mode 0600 (refused if group or others can read
it). The allowed-keys file is text, one key a line: ``ed25519:<64 hex>`` and an optional
comment after whitespace; ``#`` starts a comment line.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.files import write_atomic
from privacy.keys import KEY_FILE_MODE, read_private_file

TRANSCRIPT_LABEL = b"fedlora-handshake/v2"
ED25519_PUBLIC_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
KEY_PREFIX = "ed25519:"


def handshake_transcript(*, run_id: int, round: int, message_type: str, node_id: int,
                         server_key: bytes, server_ephemeral: bytes,
                         client_ephemeral: bytes) -> bytes:
    """The exact bytes a client signs in a handshake (every field fixed-length or prefixed)."""
    kind = message_type.encode("utf-8")
    return (TRANSCRIPT_LABEL + struct.pack(">QQQH", run_id, round, node_id, len(kind)) + kind
            + server_key + server_ephemeral + client_ephemeral)


def client_fingerprint(public_key: bytes) -> str:
    """SHA-256 hex of a raw Ed25519 public key (safe to log)."""
    return hashlib.sha256(public_key).hexdigest()


class ClientIdentity:
    """A node's long-term Ed25519 signing key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("a ClientIdentity holds an Ed25519 private key")
        self._private_key = private_key
        self.public_key_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def __repr__(self) -> str:
        return f"ClientIdentity(fingerprint={self.fingerprint()})"

    @classmethod
    def generate(cls) -> ClientIdentity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    def fingerprint(self) -> str:
        """SHA-256 hex of the raw public key."""
        return client_fingerprint(self.public_key_bytes)

    def public_line(self, comment: str = "") -> str:
        """The public key as a line of an allowed-keys file."""
        line = KEY_PREFIX + self.public_key_bytes.hex()
        return f"{line} {comment}".rstrip()

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        return self._private_key.sign(data)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the private key (PKCS#8 PEM) with mode 0600, atomically.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is false.

        """
        target = Path(path)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        write_atomic(target, self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), KEY_FILE_MODE)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClientIdentity:
        """Read a key written by :meth:`save`.

        Raises:
            PermissionError: the file is readable or writable by group or others.
            ValueError: the file is not an Ed25519 private key.

        """
        source = Path(path)
        data = read_private_file(source)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source} is not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{source} holds a {type(key).__name__}, not an Ed25519 key; "
                             "write one with `fedlora certs`")
        return cls(key)


class AllowedClients:
    """The client keys a server admits, each bound to at most one node per run."""

    def __init__(self, keys: Iterable[bytes], source: str = "") -> None:
        self._keys = {bytes(k) for k in keys}
        for key in self._keys:
            if len(key) != ED25519_PUBLIC_BYTES:
                raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(key)}")
        self.source = source
        self._nodes: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AllowedClients:
        """Parse an allowed-keys file.

        Raises:
            ValueError: a line is not ``ed25519:<64 hex> [comment]``, or the file is empty.

        """
        source = Path(path)
        keys = []
        for number, raw in enumerate(source.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            token = line.split()[0]
            hex_part = token[len(KEY_PREFIX):] if token.startswith(KEY_PREFIX) else ""
            try:
                key = bytes.fromhex(hex_part)
            except ValueError:
                key = b""
            if len(key) != ED25519_PUBLIC_BYTES:
                raise ValueError(f"{source}:{number}: expected 'ed25519:<64 hex digits> "
                                 f"[comment]', got {token[:80]!r}")
            keys.append(key)
        if not keys:
            raise ValueError(f"{source} lists no client key; write it with `fedlora certs`")
        return cls(keys, source=str(source))

    def verify(self, *, public_key: object, signature: object, transcript: bytes,
               node_id: int) -> None:
        """Check a signed handshake from ``node_id``; bind the key to that node.

        Raises:
            ValueError: unsigned, unknown key, bad signature, or the key already speaks for
                another node in this run (every reason names which).

        """
        if not isinstance(public_key, bytes) or not isinstance(signature, bytes):
            raise ValueError("unsigned handshake (this server admits only clients whose key "
                             "is in its client-keys-file; give the node its key with "
                             "--node-config client-key-file=...)")
        if len(public_key) != ED25519_PUBLIC_BYTES or \
                len(signature) != ED25519_SIGNATURE_BYTES:
            raise ValueError("malformed handshake signature or client key")
        if public_key not in self._keys:
            raise ValueError(f"client key {client_fingerprint(public_key)[:16]} is not in "
                             f"the allowed keys {self.source or ''}".rstrip())
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, transcript)
        except InvalidSignature:
            raise ValueError("bad handshake signature (the handshake was altered in "
                             "transit or signed for another run, round or node)") from None
        bound = self._nodes.setdefault(public_key, node_id)
        if bound != node_id:
            raise ValueError(f"client key {client_fingerprint(public_key)[:16]} already "
                             f"speaks for node {bound} in this run")


def write_allowed_clients(path: str | os.PathLike[str],
                          identities: Iterable[tuple[bytes, str]]) -> Path:
    """Write an allowed-keys file from ``(public key, comment)`` pairs (mode 0644)."""
    target = Path(path)
    lines = ["# fedlora client keys admitted by the server (client-keys-file)"]
    lines += [f"{KEY_PREFIX}{key.hex()} {comment}".rstrip() for key, comment in identities]
    write_atomic(target, ("\n".join(lines) + "\n").encode(), 0o644)
    return target
