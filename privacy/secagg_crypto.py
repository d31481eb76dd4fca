"""The cryptographic primitives of secure aggregation, each from a maintained library.

- key agreement: X25519 (``cryptography``), its shared secret expanded with HKDF-SHA256
  under a label that names the use and both parties, so the pairwise mask seed and the
  pairwise share-encryption key of two clients are independent;
- authenticated encryption of the secret shares a client sends through the server to
  a peer: AES-256-GCM (``cryptography``), the associated data binding run, round, sender
  and receiver (a share cannot be replayed into another round or redirected);
- secret sharing of the 16-byte seeds (and of the two halves of a 32-byte X25519 private
  key): Shamir over GF(2^128) (pycryptodome's ``Crypto.Protocol.SecretSharing``);
- masks: AES-256 in counter mode as a pseudo-random generator, its key derived from the
  seed with HKDF; every field element takes its full width of keystream (4 bytes per
  ``uint32`` element, 8 per ``uint64``), so a mask is uniform over the ring
  ``Z_{2^32}`` or ``Z_{2^64}``, with no folding of a narrower output.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 16
KEY_BYTES = 32
NONCE_BYTES = 12
#: Shamir over GF(2^128) shares 16-byte secrets; share indices are 1..255
MAX_SHARE_HOLDERS = 255
_PROTOCOL = b"fedlora-secagg-v1"


class ShareError(ValueError):
    """A share that does not decrypt, or too few shares to recover a secret."""


def new_seed() -> bytes:
    """16 bytes from the OS CSPRNG (a client's self-mask seed)."""
    return os.urandom(SEED_BYTES)


class KeyPair:
    """An X25519 key pair (a client's per-round encryption or masking key)."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self.private = private or X25519PrivateKey.generate()

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """The key pair of a 32-byte raw private key."""
        return cls(X25519PrivateKey.from_private_bytes(bytes(raw)))

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key."""
        return self.private.private_bytes(serialization.Encoding.Raw,
                                          serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)

    def agree(self, peer_public: bytes, label: str, a: int, b: int) -> bytes:
        """A 32-byte secret shared with the holder of ``peer_public``, for ``label``.

        HKDF-SHA256 over the X25519 secret; the info names the protocol, the label and
        the two node ids in ascending order, so both ends derive the same bytes.
        """
        try:
            peer = X25519PublicKey.from_public_bytes(bytes(peer_public))
        except ValueError as exc:
            raise ShareError(f"invalid X25519 public key ({exc})") from None
        secret = self.private.exchange(peer)
        lo, hi = sorted((int(a), int(b)))
        info = _PROTOCOL + b"|" + label.encode() + struct.pack(">QQ", lo, hi)
        return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(secret)


def share_aad(run_id: int, server_round: int, sender: int, receiver: int) -> bytes:
    """The associated data of an encrypted share: who sends it to whom, in which round."""
    return _PROTOCOL + struct.pack(">QQQQ", run_id, server_round, sender, receiver)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM with a fresh random nonce: ``nonce || ciphertext || tag``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Open :func:`encrypt`'s output.

    Raises:
        ShareError: wrong key, altered bytes, or other associated data.

    """
    blob = bytes(blob)
    if len(blob) < NONCE_BYTES + 16:
        raise ShareError("encrypted share too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise ShareError("encrypted share does not authenticate (altered, or not for "
                         "this node and round)") from None


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 16- or 32-byte secret: ``holders`` shares, any ``threshold`` recover it.

    A 32-byte secret is shared as two 16-byte halves under the same indices. Share ``i``
    (0-based) is for index ``i + 1``; each returned share is 16 or 32 bytes.

    Raises:
        ValueError: a secret of another length, or an impossible threshold.

    """
    if len(secret) not in (SEED_BYTES, 2 * SEED_BYTES):
        raise ValueError(f"a secret must be 16 or 32 bytes, got {len(secret)}")
    if not 1 <= threshold <= holders <= MAX_SHARE_HOLDERS:
        raise ValueError(f"need 1 <= threshold ({threshold}) <= holders ({holders}) <= "
                         f"{MAX_SHARE_HOLDERS}")
    halves = [secret[i:i + SEED_BYTES] for i in range(0, len(secret), SEED_BYTES)]
    if threshold == 1:  # a degree-0 polynomial: every share is the secret
        return [secret] * holders
    per_half = [Shamir.split(threshold, holders, half) for half in halves]
    return [b"".join(shares[i][1] for shares in per_half) for i in range(holders)]


def combine_shares(shares: dict[int, bytes], threshold: int) -> bytes:
    """The secret from ``threshold`` or more shares ``{index (1-based): share}``.

    Raises:
        ShareError: fewer than ``threshold`` shares, or shares of different lengths.

    """
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} share(s), {threshold} needed")
    chosen = sorted(shares.items())[:threshold]
    lengths = {len(s) for _, s in chosen}
    if len(lengths) != 1 or lengths.pop() not in (SEED_BYTES, 2 * SEED_BYTES):
        raise ShareError("shares of different or invalid lengths")
    if threshold == 1:
        return bytes(chosen[0][1])
    size = len(chosen[0][1])
    return b"".join(
        Shamir.combine([(i, bytes(s[off:off + SEED_BYTES])) for i, s in chosen])
        for off in range(0, size, SEED_BYTES))


def expand_mask(seed: bytes, length: int, dtype: np.dtype, label: str) -> np.ndarray:
    """``length`` uniform ring elements of ``dtype`` (``uint32``/``uint64``) from ``seed``.

    AES-256-CTR keyed by ``HKDF(seed, label)``: every element is a full-width slice of
    the keystream.
    """
    key = HKDF(hashes.SHA256(), KEY_BYTES, salt=None,
               info=_PROTOCOL + b"|mask|" + label.encode()).derive(bytes(seed))
    itemsize = np.dtype(dtype).itemsize
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(length * itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
