"""The server's long-term X25519 identity, and how a client pins it.

The ServerApp holds one long-term X25519 key pair (:class:`ServerIdentity`). Its public
key is distributed to clients out of band, as the key itself or as its fingerprint
(SHA-256 of the 32 raw public key bytes, in hex). A client never trusts a server key
that arrives through the relay: it checks it against its pin with :func:`verify_pinned`
before using it (see :mod:`privacy.transport`).

The private key is saved either as unencrypted (or password-protected) PKCS#8 PEM or
as the 32 raw bytes, always in a file only its owner can read (mode 0600); loading
refuses a key file that the group or others can read, as ssh does.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from privacy.files import write_atomic

PUBLIC_KEY_BYTES = 32
KEY_FILE_MODE = 0o600
_PIN_HEX_CHARS = 2 * PUBLIC_KEY_BYTES
_FINGERPRINT_PREFIX = "sha256:"
_PUBLIC_KEY_PREFIX = "x25519:"


class PinMismatch(ValueError):
    """The server's public key does not match the client's pin."""


def fingerprint(public_key_bytes: bytes) -> str:
    """SHA-256 of a raw 32-byte X25519 public key, as 64 lowercase hex characters."""
    _check_public_key_bytes(public_key_bytes)
    return hashlib.sha256(public_key_bytes).hexdigest()


def verify_pinned(public_key_bytes: bytes, pin: str) -> None:
    """Check a server public key against a pin, in constant time.

    Args:
        public_key_bytes: the raw 32-byte X25519 public key the server presented.
        pin: either the hex public key or the hex SHA-256 fingerprint of it. Case,
            surrounding whitespace and ``:`` separators are ignored. An explicit prefix
            (``sha256:`` for a fingerprint, ``x25519:`` for a public key) restricts the
            comparison to that form; a bare 64-hex pin is compared with both forms (safe:
            to pass as the key whose bytes equal a fingerprint, a server would need the
            private key of that point, which nobody can compute).

    Raises:
        ValueError: the pin or the key is malformed.
        PinMismatch: the key does not match the pin (a ``ValueError`` too).

    """
    _check_public_key_bytes(public_key_bytes)
    kind, expected = _parse_pin(pin)
    as_key = hmac.compare_digest(expected, public_key_bytes)
    as_fingerprint = hmac.compare_digest(expected, hashlib.sha256(public_key_bytes).digest())
    matched = {"any": as_key | as_fingerprint, "key": as_key, "fingerprint": as_fingerprint}
    if not matched[kind]:
        raise PinMismatch(
            f"server public key (fingerprint {fingerprint(public_key_bytes)}) does not "
            f"match the pinned {'key or fingerprint' if kind == 'any' else kind} {pin.strip()}"
        )


def _parse_pin(pin: str) -> tuple[Literal["any", "key", "fingerprint"], bytes]:
    """Split a pin into the form it names and its 32 bytes."""
    if not isinstance(pin, str):
        raise ValueError(f"a pin is a hex string, not {type(pin).__name__}")
    text = pin.strip().lower().replace(":", "")
    kind: Literal["any", "key", "fingerprint"] = "any"
    for prefix, named in ((_FINGERPRINT_PREFIX, "fingerprint"), (_PUBLIC_KEY_PREFIX, "key")):
        bare = prefix.rstrip(":")
        if text.startswith(bare):
            text, kind = text[len(bare):], named  # type: ignore[assignment]
            break
    if len(text) != _PIN_HEX_CHARS or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(
            f"a pin is {_PIN_HEX_CHARS} hex characters (a public key or its SHA-256 "
            f"fingerprint), got {pin!r}"
        )
    return kind, bytes.fromhex(text)


def read_private_file(source: Path) -> bytes:
    """The bytes of a private key file, refusing one that group or others can access.

    Raises:
        PermissionError: the file's mode lets group or others read or write it.

    """
    mode = stat.S_IMODE(source.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise PermissionError(
            f"{source} has mode {mode:04o}; a private key file must be 0600 "
            f"(chmod 600 {source})"
        )
    return source.read_bytes()


def _check_public_key_bytes(public_key_bytes: bytes) -> None:
    if not isinstance(public_key_bytes, bytes | bytearray):
        raise ValueError(f"a public key is bytes, not {type(public_key_bytes).__name__}")
    if len(public_key_bytes) != PUBLIC_KEY_BYTES:
        raise ValueError(
            f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key_bytes)}"
        )


class ServerIdentity:
    """The ServerApp's long-term X25519 key pair.

    Attributes:
        public_key_bytes: the raw 32-byte public key (what clients pin).

    """

    def __init__(self, private_key: X25519PrivateKey) -> None:
        if not isinstance(private_key, X25519PrivateKey):
            raise TypeError("a ServerIdentity holds an X25519 private key")
        self._private_key = private_key
        self.public_key_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def __repr__(self) -> str:
        return f"ServerIdentity(fingerprint={self.fingerprint()})"

    @classmethod
    def generate(cls) -> ServerIdentity:
        """A fresh random identity."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> ServerIdentity:
        """The identity whose private key is the 32 raw bytes ``raw``."""
        if len(raw) != PUBLIC_KEY_BYTES:
            raise ValueError(f"an X25519 private key is 32 bytes, got {len(raw)}")
        return cls(X25519PrivateKey.from_private_bytes(bytes(raw)))

    def fingerprint(self) -> str:
        """SHA-256 hex of the raw public key: the pin to hand to clients."""
        return fingerprint(self.public_key_bytes)

    def public_key_hex(self) -> str:
        """The raw public key in hex (the other form a client may pin)."""
        return self.public_key_bytes.hex()

    def exchange(self, peer_public_key: bytes) -> bytes:
        """X25519 shared secret with a peer's raw public key.

        Raises:
            ValueError: the peer key is malformed or of low order (all-zero secret).

        """
        _check_public_key_bytes(peer_public_key)
        peer = X25519PublicKey.from_public_bytes(bytes(peer_public_key))
        return self._private_key.exchange(peer)

    def private_bytes(self, form: Literal["pem", "raw"] = "pem", *,
                      password: bytes | None = None) -> bytes:
        """The private key serialised as PKCS#8 PEM (optionally encrypted) or 32 raw bytes."""
        if form == "raw":
            if password is not None:
                raise ValueError("a raw key cannot be password-protected; use form='pem'")
            return self._private_key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        if form != "pem":
            raise ValueError(f"form is 'pem' or 'raw', not {form!r}")
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password
            else serialization.NoEncryption()
        )
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def save(self, path: str | os.PathLike[str], form: Literal["pem", "raw"] = "pem", *,
             password: bytes | None = None, overwrite: bool = False) -> Path:
        """Write the private key to ``path`` with mode 0600, atomically.

        Args:
            path: the key file.
            form: ``"pem"`` (PKCS#8) or ``"raw"`` (32 bytes).
            password: encrypt the PEM with it.
            overwrite: replace an existing file; by default an existing file is an error.

        Returns:
            The path written.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is false.

        """
        target = Path(path)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        data = self.private_bytes(form, password=password)
        write_atomic(target, data, KEY_FILE_MODE)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], *,
             password: bytes | None = None) -> ServerIdentity:
        """Read a private key saved by :meth:`save` (PEM or raw, detected).

        Raises:
            PermissionError: the file is readable or writable by group or others.
            ValueError: the file is not an X25519 private key.

        """
        source = Path(path)
        data = read_private_file(source)
        if data.lstrip().startswith(b"-----BEGIN"):
            try:
                key = serialization.load_pem_private_key(data, password=password)
            except TypeError as exc:  # password missing or given for a clear key
                raise ValueError(f"{source}: {exc}") from None
            if not isinstance(key, X25519PrivateKey):
                raise ValueError(f"{source} holds a {type(key).__name__}, not an X25519 key")
            return cls(key)
        if len(data) != PUBLIC_KEY_BYTES:
            raise ValueError(f"{source} is neither a PEM key nor 32 raw bytes")
        return cls.from_private_bytes(data)
