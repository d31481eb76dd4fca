"""The server's long-term identity: key files, fingerprints and pinning."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy import keys
from privacy.keys import PinMismatch, ServerIdentity, fingerprint, verify_pinned


@pytest.fixture(scope="module")
def identity() -> ServerIdentity:
    return ServerIdentity.generate()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_fingerprint_is_sha256_of_the_raw_public_key(identity: ServerIdentity) -> None:
    assert len(identity.public_key_bytes) == 32
    assert identity.fingerprint() == hashlib.sha256(identity.public_key_bytes).hexdigest()
    assert fingerprint(identity.public_key_bytes) == identity.fingerprint()
    assert identity.public_key_hex() == identity.public_key_bytes.hex()
    assert identity.fingerprint() in repr(identity)


@pytest.mark.parametrize("form", ["pem", "raw"])
def test_save_and_load_round_trip_with_mode_0600(identity: ServerIdentity, tmp_path: Path,
                                                 form: str) -> None:
    path = identity.save(tmp_path / f"server.{form}", form)  # type: ignore[arg-type]
    assert mode_of(path) == 0o600
    loaded = ServerIdentity.load(path)
    assert loaded.public_key_bytes == identity.public_key_bytes
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    if form == "pem":
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    else:
        assert len(path.read_bytes()) == 32


def test_password_protected_pem(identity: ServerIdentity, tmp_path: Path) -> None:
    path = identity.save(tmp_path / "server.pem", password=b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    assert ServerIdentity.load(path, password=b"correct horse").fingerprint() == \
        identity.fingerprint()
    with pytest.raises(ValueError, match="[Pp]assword"):
        ServerIdentity.load(path)
    with pytest.raises(ValueError):
        ServerIdentity.load(path, password=b"wrong")


def test_save_refuses_to_overwrite_unless_asked(identity: ServerIdentity,
                                                tmp_path: Path) -> None:
    path = identity.save(tmp_path / "server.pem")
    other = ServerIdentity.generate()
    with pytest.raises(FileExistsError):
        other.save(path)
    other.save(path, overwrite=True)
    assert mode_of(path) == 0o600
    assert ServerIdentity.load(path).fingerprint() == other.fingerprint()


def test_load_refuses_a_key_file_others_can_read(identity: ServerIdentity,
                                                 tmp_path: Path) -> None:
    path = identity.save(tmp_path / "server.pem")
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="0600"):
        ServerIdentity.load(path)


def test_load_rejects_other_key_types_and_garbage(tmp_path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    for name, data in (("ed.pem", pem), ("short.key", b"\x01" * 31)):
        path = tmp_path / name
        path.write_bytes(data)
        path.chmod(0o600)
        with pytest.raises(ValueError):
            ServerIdentity.load(path)


def test_exchange_agrees_with_the_peer(identity: ServerIdentity) -> None:
    peer = ServerIdentity.generate()
    assert identity.exchange(peer.public_key_bytes) == peer.exchange(identity.public_key_bytes)
    with pytest.raises(ValueError):
        identity.exchange(bytes(32))  # low-order point: all-zero shared secret


@pytest.mark.parametrize("form", ["key", "fingerprint"])
def test_pin_accepts_the_key_or_its_fingerprint(identity: ServerIdentity, form: str) -> None:
    pin = identity.public_key_hex() if form == "key" else identity.fingerprint()
    prefix = "x25519:" if form == "key" else "sha256:"
    for variant in (pin, pin.upper(), f"  {pin}\n", ":".join(pin[i:i + 2] for i in range(0, 64, 2)),
                    prefix + pin):
        verify_pinned(identity.public_key_bytes, variant)


def test_pin_mismatch_is_a_clear_value_error(identity: ServerIdentity) -> None:
    impostor = ServerIdentity.generate()
    for pin in (identity.fingerprint(), identity.public_key_hex()):
        with pytest.raises(PinMismatch, match="does not match the pinned") as info:
            verify_pinned(impostor.public_key_bytes, pin)
        assert isinstance(info.value, ValueError)
        assert impostor.fingerprint() in str(info.value)


def test_prefixed_pin_only_matches_its_own_form(identity: ServerIdentity) -> None:
    with pytest.raises(PinMismatch):
        verify_pinned(identity.public_key_bytes, "sha256:" + identity.public_key_hex())
    with pytest.raises(PinMismatch):
        verify_pinned(identity.public_key_bytes, "x25519:" + identity.fingerprint())


@pytest.mark.parametrize("pin", ["", "abc", "zz" * 32, "00" * 33, "md5:" + "00" * 32])
def test_malformed_pin_is_rejected(identity: ServerIdentity, pin: str) -> None:
    with pytest.raises(ValueError, match="hex characters"):
        verify_pinned(identity.public_key_bytes, pin)


def test_malformed_public_key_is_rejected(identity: ServerIdentity) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        verify_pinned(identity.public_key_bytes[:31], identity.fingerprint())


def test_pin_comparison_is_constant_time(identity: ServerIdentity,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = keys.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    verify_pinned(identity.public_key_bytes, identity.fingerprint())
    # both forms are always compared (no early exit), each with compare_digest
    assert len(calls) == 2
