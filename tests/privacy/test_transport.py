"""End-to-end payload sealing: round trips, tampering, replay, nonces, keys, limits."""

from __future__ import annotations

import dataclasses
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from privacy import transport
from privacy.keys import ServerIdentity
from privacy.transport import (
    MAX_ENCRYPTIONS,
    EphemeralKey,
    NonceSequence,
    PayloadContext,
    PayloadRejected,
    ReplayGuard,
    SealedPayload,
    SessionKeys,
    client_session_keys,
    manifest_of,
    open_sealed,
    seal_arrays,
    server_session_keys,
)

RUN = 2**63 + 11  # Flower ids are unsigned 64-bit
SERVER = 1
CLIENT = 2**64 - 3
OTHER_CLIENT = 77
MAX = 1 << 20


@dataclasses.dataclass
class Round:
    """Both sides' keys for one round between the server and one client."""

    round: int
    client: int
    server: SessionKeys
    node: SessionKeys

    def s2c(self) -> PayloadContext:
        return PayloadContext(RUN, self.round, SERVER, self.client)

    def c2s(self) -> PayloadContext:
        return PayloadContext(RUN, self.round, self.client, SERVER)


@pytest.fixture(scope="module")
def identity() -> ServerIdentity:
    return ServerIdentity.generate()


def handshake(identity: ServerIdentity, rnd: int, client: int = CLIENT,
              server_eph: EphemeralKey | None = None) -> Round:
    server_eph = server_eph or EphemeralKey()
    client_eph = EphemeralKey()
    node = client_session_keys(
        client_eph, server_public_key=identity.public_key_bytes,
        server_ephemeral_key=server_eph.public_key_bytes, pin=identity.fingerprint(),
        run_id=RUN, round=rnd, client_node=client)
    server = server_session_keys(
        identity, server_eph, client_public_key=client_eph.public_key_bytes, run_id=RUN,
        round=rnd, client_node=client)
    return Round(rnd, client, server, node)


def adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "base_model.model.layer.0.query.lora_A.weight": rng.standard_normal((8, 24), np.float32),
        "base_model.model.layer.0.query.lora_B.weight": rng.standard_normal((24, 8), np.float32),
        "base_model.model.classifier.weight": rng.standard_normal((5, 24), np.float32),
        "base_model.model.classifier.bias": rng.standard_normal(5, np.float32),
    }


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value)


def through_flower(payload: SealedPayload) -> SealedPayload:
    """What the receiver gets after Flower serialises and restores the record."""
    return SealedPayload.from_record(ConfigRecord.inflate(payload.to_record().deflate()))


# --------------------------------------------------------------------- round trips


def test_round_trip_server_to_client(identity: ServerIdentity) -> None:
    r = handshake(identity, 3)
    sent = adapter()
    sealed = seal_arrays(sent, key=r.server.send, context=r.s2c())
    got = open_sealed(through_flower(sealed), key=r.node.receive, context=r.s2c(), max_bytes=MAX,
                      expected_manifest=manifest_of(sent))
    assert_same(got, sent)
    assert all(a.flags.writeable for a in got.values())


def test_round_trip_client_to_server_from_an_array_record(identity: ServerIdentity) -> None:
    r = handshake(identity, 3)
    sent = adapter(1)
    record = ArrayRecord({name: Array(value) for name, value in sent.items()})
    sealed = seal_arrays(record, key=r.node.send, context=r.c2s())
    guard = ReplayGuard(run_id=RUN, receiver=SERVER, round=3)
    got = open_sealed(through_flower(sealed), key=r.server.receive, context=r.c2s(),
                      max_bytes=MAX, expected_manifest=record, guard=guard)
    assert_same(got, sent)


def test_round_trip_dtypes_shapes_and_byte_order(identity: ServerIdentity) -> None:
    r = handshake(identity, 0)
    sent = {
        "scalar": np.array(3.5, np.float64),
        "empty": np.zeros((0, 4), np.float32),
        "mask": np.array([True, False, True]),
        "half": np.arange(6, dtype=np.float16).reshape(2, 3),
        "ints": np.arange(-4, 8, dtype=np.int64).reshape(3, 2, 2),
        "big_endian": np.arange(10, dtype=">f4"),
        "strided": np.arange(40, dtype=np.float32).reshape(5, 8)[:, ::2],
    }
    sealed = seal_arrays(sent, key=r.server.send, context=r.s2c())
    got = open_sealed(sealed, key=r.node.receive, context=r.s2c(), max_bytes=MAX)
    assert sorted(got) == sorted(sent)
    for name, value in sent.items():
        assert got[name].shape == value.shape
        assert got[name].dtype == value.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got[name], value)


def test_wire_format_is_a_config_record_of_ints_bytes_and_a_manifest(
        identity: ServerIdentity) -> None:
    r = handshake(identity, 1)
    sent = adapter()
    record = seal_arrays(sent, key=r.node.send, context=r.c2s()).to_record()
    assert isinstance(record["ciphertext"], bytes) and isinstance(record["nonce"], bytes)
    raw = sum(v.nbytes for v in sent.values())
    assert len(record["ciphertext"]) == raw + 16
    assert len(record["nonce"]) == 12
    assert record["manifest"].startswith('[["base_model.model.classifier.bias",[5],"float32"]')
    for value in sent.values():  # the relay never sees plaintext
        assert value.tobytes()[:16] not in record["ciphertext"]


# --------------------------------------------------------------------- tampering


FIELDS = ("ciphertext", "nonce", "manifest", "sender", "receiver", "round", "run-id", "version")


def flip(record: dict, field: str, rng: np.random.Generator) -> dict:
    """A copy of ``record`` with one random bit of ``field`` flipped."""
    out = dict(record)
    value = record[field]
    if isinstance(value, bytes):
        buf = bytearray(value)
        bit = int(rng.integers(len(buf) * 8))
        buf[bit // 8] ^= 1 << (bit % 8)
        out[field] = bytes(buf)
    elif isinstance(value, str):  # flip one bit of one character's code point
        pos, bit = int(rng.integers(len(value))), int(rng.integers(16))
        out[field] = value[:pos] + chr(ord(value[pos]) ^ (1 << bit)) + value[pos + 1:]
    else:
        out[field] = value ^ (1 << int(rng.integers(64 if field != "version" else 16)))
    return out


def test_ten_thousand_single_bit_flips_are_all_rejected(identity: ServerIdentity) -> None:
    r = handshake(identity, 5)
    sent = adapter()
    sealed = seal_arrays(sent, key=r.node.send, context=r.c2s())
    record = dict(sealed.to_record())
    rng = np.random.default_rng(1234)
    reasons: dict[str, set[str]] = {field: set() for field in FIELDS}
    start = time.perf_counter()
    for i in range(10_000):
        field = FIELDS[i % len(FIELDS)]
        tampered = flip(record, field, rng)
        assert tampered[field] != record[field]
        with pytest.raises(PayloadRejected) as info:
            payload = SealedPayload.from_record(ConfigRecord(tampered))
            open_sealed(payload, key=r.server.receive, context=r.c2s(), max_bytes=MAX)
        reasons[field].add(info.value.reason.split(":")[0])
    elapsed = time.perf_counter() - start
    assert reasons["ciphertext"] == {"authentication failed"}
    assert reasons["nonce"] == {"authentication failed"}
    assert reasons["round"] == {"wrong round"}
    assert reasons["run-id"] == {"wrong run"}
    assert all(reasons.values())
    # the untouched payload still opens: every flip was caught, not a broken key
    got = open_sealed(SealedPayload.from_record(ConfigRecord(record)), key=r.server.receive,
                      context=r.c2s(), max_bytes=MAX)
    assert_same(got, sent)
    assert elapsed < 30, f"10,000 rejections took {elapsed:.1f}s"


def test_header_rewritten_to_match_still_fails_authentication(identity: ServerIdentity) -> None:
    """An attacker who rewrites the clear fields consistently still cannot pass the AAD."""
    r = handshake(identity, 5)
    other = handshake(identity, 5, client=OTHER_CLIENT)
    sealed = seal_arrays(adapter(), key=r.node.send, context=r.c2s())
    forged = dataclasses.replace(sealed, sender=OTHER_CLIENT)
    with pytest.raises(PayloadRejected, match="authentication failed"):
        open_sealed(forged, key=other.server.receive, context=other.c2s(), max_bytes=MAX)
    manifest = sealed.manifest.replace("[5]", "[5 ]")
    with pytest.raises(PayloadRejected, match="authentication failed"):
        open_sealed(dataclasses.replace(sealed, manifest=manifest), key=r.server.receive,
                    context=r.c2s(), max_bytes=MAX)


# --------------------------------------------------------------------- replay and direction


def test_message_from_the_previous_round_is_rejected(identity: ServerIdentity) -> None:
    previous, current = handshake(identity, 6), handshake(identity, 7)
    old = seal_arrays(adapter(), key=previous.node.send, context=previous.c2s())
    with pytest.raises(PayloadRejected, match="wrong round: payload is for round 6"):
        open_sealed(old, key=current.server.receive, context=current.c2s(), max_bytes=MAX)
    # relabelling it as round 7 does not help: other key, other associated data
    relabelled = dataclasses.replace(old, round=7)
    with pytest.raises(PayloadRejected, match="authentication failed"):
        open_sealed(relabelled, key=current.server.receive, context=current.c2s(),
                    max_bytes=MAX)
    guard = ReplayGuard(run_id=RUN, receiver=SERVER, round=6)
    guard.begin_round(7)
    with pytest.raises(PayloadRejected, match="replay: wrong round 6"):
        guard.check(old)


def test_replay_within_a_round_is_rejected_by_the_guard(identity: ServerIdentity) -> None:
    r = handshake(identity, 8)
    guard = ReplayGuard(run_id=RUN, receiver=SERVER, round=8)
    sealed = seal_arrays(adapter(), key=r.node.send, context=r.c2s())
    open_sealed(sealed, key=r.server.receive, context=r.c2s(), max_bytes=MAX, guard=guard)
    with pytest.raises(PayloadRejected, match="replay: message .* already accepted"):
        open_sealed(through_flower(sealed), key=r.server.receive, context=r.c2s(),
                    max_bytes=MAX, guard=guard)
    # a fresh message from the same client in the same round is a different message
    again = seal_arrays(adapter(), key=r.node.send, context=r.c2s())
    open_sealed(again, key=r.server.receive, context=r.c2s(), max_bytes=MAX, guard=guard)


def test_guard_records_only_authenticated_messages(identity: ServerIdentity) -> None:
    r = handshake(identity, 8)
    guard = ReplayGuard(run_id=RUN, receiver=SERVER, round=8)
    sealed = seal_arrays(adapter(), key=r.node.send, context=r.c2s())
    forged = dataclasses.replace(sealed, ciphertext=bytes(len(sealed.ciphertext)))
    with pytest.raises(PayloadRejected, match="authentication failed"):
        open_sealed(forged, key=r.server.receive, context=r.c2s(), max_bytes=MAX, guard=guard)
    # the forgery (same sender and nonce) did not poison the guard
    open_sealed(sealed, key=r.server.receive, context=r.c2s(), max_bytes=MAX, guard=guard)


def test_guard_rejects_other_runs_receivers_and_going_back(identity: ServerIdentity) -> None:
    r = handshake(identity, 9)
    sealed = seal_arrays(adapter(), key=r.node.send, context=r.c2s())
    with pytest.raises(PayloadRejected, match="replay: payload is for run"):
        ReplayGuard(run_id=RUN + 1, receiver=SERVER, round=9).check(sealed)
    with pytest.raises(PayloadRejected, match=f"addressed to node {SERVER}, not 5"):
        ReplayGuard(run_id=RUN, receiver=5, round=9).check(sealed)
    guard = ReplayGuard(run_id=RUN, receiver=SERVER, round=9)
    with pytest.raises(PayloadRejected, match="before the current round"):
        guard.begin_round(8)


def test_swapped_sender_and_receiver_are_rejected(identity: ServerIdentity) -> None:
    r = handshake(identity, 10)
    down = seal_arrays(adapter(), key=r.server.send, context=r.s2c())
    # the server's own message reflected back to it as if the client had sent it
    with pytest.raises(PayloadRejected, match=f"addressed to node {CLIENT}, not {SERVER}"):
        open_sealed(down, key=r.server.receive, context=r.c2s(), max_bytes=MAX)
    swapped = dataclasses.replace(down, sender=down.receiver, receiver=down.sender)
    with pytest.raises(PayloadRejected, match="authentication failed"):
        open_sealed(swapped, key=r.server.receive, context=r.c2s(), max_bytes=MAX)
    # and a client's upload reflected back down to the client
    up = seal_arrays(adapter(), key=r.node.send, context=r.c2s())
    with pytest.raises(PayloadRejected, match="authentication failed"):
        open_sealed(dataclasses.replace(up, sender=SERVER, receiver=CLIENT),
                    key=r.node.receive, context=r.s2c(), max_bytes=MAX)


def test_key_for_another_client_or_direction_is_refused(identity: ServerIdentity) -> None:
    r = handshake(identity, 11)
    wrong = PayloadContext(RUN, 11, OTHER_CLIENT, SERVER)
    with pytest.raises(PayloadRejected, match=f"belongs to client {CLIENT}"):
        seal_arrays(adapter(), key=r.node.send, context=wrong)
    with pytest.raises(PayloadRejected, match="can only open"):
        seal_arrays(adapter(), key=r.node.receive, context=r.s2c())
    assert r.node.send.can_seal and not r.node.receive.can_seal


# --------------------------------------------------------------------- nonces and keys


def test_no_nonce_repeats_over_a_million_nonces() -> None:
    sequence = NonceSequence()
    nonces = [sequence.next() for _ in range(1_000_000)]
    assert sequence.issued == 1_000_000
    assert all(len(n) == 12 for n in nonces[:1000])
    assert len(set(nonces)) == len(nonces)
    counters = np.frombuffer(b"".join(n[:4] for n in nonces), dtype=">u4")
    assert np.array_equal(counters, np.arange(1_000_000))
    # a second sequence (the same key derived twice) differs in its random half
    other = NonceSequence()
    assert not {other.next() for _ in range(1000)} & set(nonces[:1000])


def test_a_key_refuses_to_seal_more_than_two_to_the_32_times(identity: ServerIdentity) -> None:
    with pytest.raises(PayloadRejected, match="key exhausted"):
        seq = NonceSequence(limit=3)
        for _ in range(4):
            seq.next()
    r = handshake(identity, 12)
    r.node.send._nonces._count = MAX_ENCRYPTIONS - 1  # type: ignore[union-attr]
    last = seal_arrays(adapter(), key=r.node.send, context=r.c2s())
    assert last.nonce[:4] == b"\xff\xff\xff\xff"
    with pytest.raises(PayloadRejected, match="key exhausted"):
        seal_arrays(adapter(), key=r.node.send, context=r.c2s())


def test_nonces_of_a_key_are_fresh_for_every_payload(identity: ServerIdentity) -> None:
    r = handshake(identity, 12)
    payloads = [seal_arrays(adapter(), key=r.node.send, context=r.c2s()) for _ in range(50)]
    assert len({p.nonce for p in payloads}) == 50
    assert len({p.ciphertext for p in payloads}) == 50


def test_a_new_key_every_round(identity: ServerIdentity) -> None:
    server_eph = EphemeralKey()
    this, following = handshake(identity, 13, server_eph=server_eph), handshake(identity, 14)
    ids = {k.key_id for r in (this, following) for k in (r.server.send, r.server.receive)}
    assert len(ids) == 4  # per round and per direction
    assert this.server.send.key_id == this.node.receive.key_id
    assert this.node.send.key_id == this.server.receive.key_id
    # same ephemeral keys but another round number: still another key (round is in the info)
    again = handshake(identity, 13, server_eph=server_eph)
    assert again.server.send.key_id != this.server.send.key_id
    sealed = seal_arrays(adapter(), key=this.node.send, context=this.c2s())
    with pytest.raises(PayloadRejected, match="key is for run .* round 14"):
        open_sealed(sealed, key=following.server.receive, context=this.c2s(), max_bytes=MAX)
    with pytest.raises(PayloadRejected, match="authentication failed"):
        open_sealed(dataclasses.replace(sealed, round=14), key=following.server.receive,
                    context=following.c2s(), max_bytes=MAX)


def test_an_ephemeral_key_restored_from_state_derives_the_same_keys(
        identity: ServerIdentity) -> None:
    server_eph, client_eph = EphemeralKey(), EphemeralKey()
    restored = EphemeralKey.from_private_bytes(client_eph.private_bytes())
    assert restored.public_key_bytes == client_eph.public_key_bytes
    kwargs = dict(server_public_key=identity.public_key_bytes,
                  server_ephemeral_key=server_eph.public_key_bytes, pin=identity.fingerprint(),
                  run_id=RUN, round=1, client_node=CLIENT)
    a = client_session_keys(client_eph, **kwargs)  # type: ignore[arg-type]
    b = client_session_keys(restored, **kwargs)  # type: ignore[arg-type]
    assert a.send.key_id == b.send.key_id
    # both objects may seal: their nonces still differ (random half)
    ctx = PayloadContext(RUN, 1, CLIENT, SERVER)
    assert seal_arrays(adapter(), key=a.send, context=ctx).nonce != \
        seal_arrays(adapter(), key=b.send, context=ctx).nonce


# --------------------------------------------------------------------- server authentication


def test_client_rejects_a_server_that_does_not_match_the_pin(identity: ServerIdentity) -> None:
    impostor = ServerIdentity.generate()
    with pytest.raises(PayloadRejected, match="untrusted server"):
        client_session_keys(
            EphemeralKey(), server_public_key=impostor.public_key_bytes,
            server_ephemeral_key=EphemeralKey().public_key_bytes, pin=identity.fingerprint(),
            run_id=RUN, round=1, client_node=CLIENT)
    with pytest.raises(PayloadRejected, match="cannot check the server key"):
        client_session_keys(
            EphemeralKey(), server_public_key=identity.public_key_bytes,
            server_ephemeral_key=EphemeralKey().public_key_bytes, pin="not-a-pin",
            run_id=RUN, round=1, client_node=CLIENT)


def test_a_relay_that_swaps_the_server_ephemeral_key_learns_nothing(
        identity: ServerIdentity) -> None:
    """Without the server's static private key no one can derive the client's key."""
    server_eph, relay_eph, client_eph = EphemeralKey(), EphemeralKey(), EphemeralKey()
    node = client_session_keys(
        client_eph, server_public_key=identity.public_key_bytes,
        server_ephemeral_key=relay_eph.public_key_bytes, pin=identity.fingerprint(),
        run_id=RUN, round=2, client_node=CLIENT)
    relay_as_server = server_session_keys(  # the relay's best try: its own "static" key
        ServerIdentity.generate(), relay_eph, client_public_key=client_eph.public_key_bytes,
        run_id=RUN, round=2, client_node=CLIENT)
    server = server_session_keys(
        identity, server_eph, client_public_key=client_eph.public_key_bytes, run_id=RUN,
        round=2, client_node=CLIENT)
    ctx = PayloadContext(RUN, 2, CLIENT, SERVER)
    sealed = seal_arrays(adapter(), key=node.send, context=ctx)
    for receiver in (relay_as_server, server):
        with pytest.raises(PayloadRejected, match="authentication failed"):
            open_sealed(sealed, key=receiver.receive, context=ctx, max_bytes=MAX)


def test_low_order_or_malformed_public_keys_are_rejected(identity: ServerIdentity) -> None:
    for bad in (bytes(32), b"\x01" + bytes(31), b"short", "00" * 32):
        with pytest.raises(PayloadRejected, match="public key"):
            server_session_keys(identity, EphemeralKey(), client_public_key=bad,  # type: ignore[arg-type]
                                run_id=RUN, round=1, client_node=CLIENT)


# --------------------------------------------------------------------- size and parsing


def test_oversized_ciphertext_is_rejected_before_decryption(
        identity: ServerIdentity, monkeypatch: pytest.MonkeyPatch) -> None:
    r = handshake(identity, 15)
    sealed = seal_arrays({"w": np.zeros(1000, np.float32)}, key=r.node.send, context=r.c2s())
    calls: list[int] = []

    def decrypt_spy(self: object, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytearray:
        calls.append(len(ciphertext))
        raise AssertionError("decryption must not be attempted")

    monkeypatch.setattr(transport.SessionKey, "_decrypt", decrypt_spy)
    with pytest.raises(PayloadRejected, match="payload of 4016 bytes exceeds 4015"):
        open_sealed(sealed, key=r.server.receive, context=r.c2s(), max_bytes=4015)
    huge = dataclasses.replace(sealed, ciphertext=bytes(64 << 20))
    with pytest.raises(PayloadRejected, match=f"payload of {64 << 20} bytes exceeds"):
        open_sealed(huge, key=r.server.receive, context=r.c2s(), max_bytes=MAX)
    # a ciphertext whose length disagrees with the manifest never reaches decryption either
    short = dataclasses.replace(sealed, ciphertext=sealed.ciphertext[:-4])
    with pytest.raises(PayloadRejected, match="does not match the manifest"):
        open_sealed(short, key=r.server.receive, context=r.c2s(), max_bytes=MAX)
    assert calls == []
    monkeypatch.undo()
    got = open_sealed(sealed, key=r.server.receive, context=r.c2s(), max_bytes=4016)
    assert got["w"].shape == (1000,)


def test_expected_manifest_mismatch_is_rejected_before_decryption(
        identity: ServerIdentity) -> None:
    r = handshake(identity, 16)
    sent = adapter()
    sealed = seal_arrays(sent, key=r.node.send, context=r.c2s())
    wider = dict(sent, **{"base_model.model.classifier.bias": np.zeros(6, np.float32)})
    with pytest.raises(PayloadRejected, match="classifier.bias is \\(\\(5,\\), 'float32'\\)"):
        open_sealed(sealed, key=r.server.receive, context=r.c2s(), max_bytes=MAX,
                    expected_manifest=wider)
    with pytest.raises(PayloadRejected, match="missing \\['extra'\\]"):
        open_sealed(sealed, key=r.server.receive, context=r.c2s(), max_bytes=MAX,
                    expected_manifest=[*manifest_of(sent), ("extra", (1,), "float32")])


@pytest.mark.parametrize("manifest", [
    "", "{}", "[1]", '[["a",[1],"object"]]', '[["a",[1.0],"float32"]]', '[["a",[-1],"uint8"]]',
    '[["a",[true],"uint8"]]', '[["b",[1],"uint8"],["a",[1],"uint8"]]', "[" * 100_000,
    '[["a",[NaN],"uint8"]]', "x" * (transport.MAX_MANIFEST_CHARS + 1),
])
def test_malformed_manifests_are_rejected(identity: ServerIdentity, manifest: str) -> None:
    r = handshake(identity, 17)
    sealed = seal_arrays({"a": np.zeros(1, np.uint8)}, key=r.node.send, context=r.c2s())
    with pytest.raises(PayloadRejected, match="manifest"):
        open_sealed(dataclasses.replace(sealed, manifest=manifest), key=r.server.receive,
                    context=r.c2s(), max_bytes=MAX)


def test_malformed_records_are_rejected(identity: ServerIdentity) -> None:
    r = handshake(identity, 18)
    record = dict(seal_arrays(adapter(), key=r.node.send, context=r.c2s()).to_record())
    bad = [
        {k: v for k, v in record.items() if k != "nonce"},
        dict(record, extra=b"x"),
        dict(record, round=True),
        dict(record, nonce="0" * 12),
        dict(record, ciphertext=[b"a", b"b"]),
        dict(record, sender=-1),
    ]
    for fields in bad:
        with pytest.raises(PayloadRejected, match="sealed record|sender must be"):
            SealedPayload.from_record(ConfigRecord(fields))
    with pytest.raises(PayloadRejected, match="expected a ConfigRecord"):
        SealedPayload.from_record(b"not a record")  # type: ignore[arg-type]


def test_context_ids_must_be_unsigned_64_bit() -> None:
    for bad in (-1, 2**64, True, 1.0):
        with pytest.raises(PayloadRejected, match="must be an integer"):
            PayloadContext(RUN, bad, SERVER, CLIENT)  # type: ignore[arg-type]


# --------------------------------------------------------------------- no pickle, ever


class Exploit:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def test_a_pickle_payload_is_rejected_and_never_unpickled(identity: ServerIdentity,
                                                         tmp_path: Path) -> None:
    # the exploit is live: unpickling it really does create its marker
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Exploit(control))).close()  # noqa: S301
    assert control.exists()

    marker = tmp_path / "pwned"
    blob = pickle.dumps(Exploit(marker))
    r = handshake(identity, 19)
    expected = manifest_of(adapter())

    # 1. an object array cannot even be sealed
    evil = np.empty(1, dtype=object)
    evil[0] = Exploit(marker)
    with pytest.raises(PayloadRejected, match="dtype object"):
        seal_arrays({"base_model.model.classifier.bias": evil}, key=r.node.send,
                    context=r.c2s())

    # 2. the pickle bytes sealed as a byte array: the manifest check rejects them
    as_bytes = seal_arrays({"base_model.model.classifier.bias": np.frombuffer(blob, np.uint8)},
                           key=r.node.send, context=r.c2s())
    with pytest.raises(PayloadRejected, match="manifest differs"):
        open_sealed(through_flower(as_bytes), key=r.server.receive, context=r.c2s(),
                    max_bytes=MAX, expected_manifest=expected)
    # (and without an expected manifest they are only ever bytes, never unpickled)
    got = open_sealed(as_bytes, key=r.server.receive, context=r.c2s(), max_bytes=MAX)
    assert got["base_model.model.classifier.bias"].tobytes() == blob

    # 3. a malicious sender with a valid key forges raw plaintext and a manifest claiming
    #    a pickled object, or float32 arrays the pickle bytes do not fill
    for manifest in (f'[["x",[{len(blob)}],"object"]]', f'[["x",[{len(blob)}],"float32"]]',
                     f'[["x",[{len(blob)}],"|O"]]'):
        forged = transport._seal_plaintext(blob, manifest, key=r.node.send, context=r.c2s())
        with pytest.raises(PayloadRejected):
            open_sealed(through_flower(forged), key=r.server.receive, context=r.c2s(),
                        max_bytes=MAX)
    assert not marker.exists()


def test_associated_data_binds_every_header_field(identity: ServerIdentity,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With the cheap header and key checks out of the way, AES-GCM alone still rejects.

    The receiver is made to expect exactly what the tampered header says, and the key's
    own binding check is disabled, so only the associated data can catch the change.
    """
    r = handshake(identity, 20)
    sealed = seal_arrays(adapter(), key=r.node.send, context=r.c2s())
    monkeypatch.setattr(transport.SessionKey, "check_context", lambda self, context: None)
    rng = np.random.default_rng(7)
    for field in ("sender", "receiver", "round", "run_id"):
        for _ in range(100):
            value = getattr(sealed, field) ^ (1 << int(rng.integers(64)))
            forged = dataclasses.replace(sealed, **{field: value})
            context = PayloadContext(forged.run_id, forged.round, forged.sender,
                                     forged.receiver)
            with pytest.raises(PayloadRejected, match="^authentication failed$"):
                open_sealed(forged, key=r.server.receive, context=context, max_bytes=MAX)
