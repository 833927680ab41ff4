"""Peer keys and owner-signed records, in-process: file handling, peer ids, every validation rule."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import msgspec
import pytest
from hivemind.dht.validation import DHTRecord

from meshinfer.errors import PeerIdentityError
from meshinfer.p2p.daemon import start_p2p, stop_p2p
from meshinfer.p2p.identity import (
    Identity,
    IdentityLock,
    load_or_create_identity,
    peer_id_of_public_key,
    verify_signature,
)
from meshinfer.p2p.signing import Envelope, SignedRecordValidator, make_envelope, owner_of
from meshinfer.types import BlockRange
from meshinfer.wire.records import ModelCard, ServerRecord, encode_record

ALICE = Identity.generate()
MALLORY = Identity.generate()
KEY = b"\x01" * 20  # what the DHT passes: the 20-byte id of the key's hash
pack = msgspec.msgpack.encode


def server_record(peer_id: str) -> bytes:
    return pack(encode_record(ServerRecord(
        peer_id=peer_id, model_id="m", span=BlockRange(0, 2), state="online", throughput=1.0,
        cache_tokens_left=10, addresses=[], software_version="0.1.0")))


def signed(identity: Identity, subkey: str, payload: bytes, expiration: float | None = None) -> DHTRecord:
    rec = DHTRecord(KEY, pack(subkey), payload, expiration or time.time() + 60)
    return DHTRecord(rec.key, rec.subkey, make_envelope(identity, rec), rec.expiration_time)


def test_key_file_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    first = load_or_create_identity(path)
    assert first.created and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = load_or_create_identity(path)
    assert not again.created and again.peer_id == first.peer_id and again.peer_id.startswith("Qm")
    assert Identity.from_bytes(path.read_bytes()).peer_id == first.peer_id


def test_key_file_problems_are_peer_identity_errors(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    load_or_create_identity(path)
    path.chmod(0o640)
    with pytest.raises(PeerIdentityError, match="chmod 600"):
        load_or_create_identity(path)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(os.urandom(100))
    garbage.chmod(0o600)
    with pytest.raises(PeerIdentityError, match="unreadable peer key"):
        load_or_create_identity(garbage)
    with pytest.raises(PeerIdentityError, match="does not exist"):
        load_or_create_identity(tmp_path / "missing-dir" / "k.key")
    with pytest.raises(PeerIdentityError, match="not a regular file"):
        load_or_create_identity(tmp_path)


def test_lock_refuses_a_second_user_of_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    ident = load_or_create_identity(path)
    first, second = IdentityLock(path), IdentityLock(path)
    first.acquire(ident.peer_id)
    with pytest.raises(PeerIdentityError, match="already in use"):
        second.acquire(ident.peer_id)
    first.release()
    second.acquire(ident.peer_id)
    second.release()


def test_peer_id_matches_the_daemon(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path / "peer.key")

    async def daemon_peer_id() -> str:
        p2p = await start_p2p(ident)
        try:
            return p2p.peer_id.to_base58()
        finally:
            await stop_p2p(p2p)

    assert asyncio.run(daemon_peer_id()) == ident.peer_id


def test_signatures() -> None:
    sig = ALICE.sign(b"data")
    assert verify_signature(ALICE.public_key, b"data", sig)
    assert not verify_signature(ALICE.public_key, b"datA", sig)
    assert not verify_signature(MALLORY.public_key, b"data", sig)
    assert not verify_signature(b"garbage", b"data", sig)
    assert peer_id_of_public_key(ALICE.public_key) == ALICE.peer_id


def test_valid_records_pass_and_strip_to_the_payload() -> None:
    v = SignedRecordValidator(None)
    rec = signed(ALICE, ALICE.peer_id, server_record(ALICE.peer_id))
    assert v.validate(rec)
    assert v.strip_value(rec) == server_record(ALICE.peer_id)
    card = pack(encode_record(ModelCard(model_id="0" * 32, name="n", family="llama", num_blocks=2, hidden_size=8,
                                        dtype="float32")))
    tagged = signed(ALICE, f"{ALICE.peer_id}/{'0' * 32}", card)
    assert v.validate(tagged) and owner_of(f"{ALICE.peer_id}/m") == ALICE.peer_id


def test_owner_only() -> None:
    v = SignedRecordValidator(None)
    # Mallory signs a record under Alice's subkey (or a tag of it): the key does not match the owner.
    assert not v.validate(signed(MALLORY, ALICE.peer_id, server_record(ALICE.peer_id)))
    assert not v.validate(signed(MALLORY, f"{ALICE.peer_id}/m", server_record(ALICE.peer_id)))
    # Mallory's own record must describe Mallory.
    assert not v.validate(signed(MALLORY, MALLORY.peer_id, server_record(ALICE.peer_id)))


def test_tampering_is_detected() -> None:
    v = SignedRecordValidator(None)
    rec = signed(ALICE, ALICE.peer_id, server_record(ALICE.peer_id))
    env = msgspec.msgpack.decode(rec.value, type=Envelope)
    for bad in (
        Envelope(env.payload, env.public_key, env.signature[:-1] + bytes([env.signature[-1] ^ 1])),
        Envelope(server_record(ALICE.peer_id).replace(b"online", b"joinin"), env.public_key, env.signature),
        Envelope(env.payload, MALLORY.public_key, env.signature),
    ):
        assert not v.validate(DHTRecord(rec.key, rec.subkey, pack(bad), rec.expiration_time))
    # the signature covers the key and the expiration too
    assert not v.validate(DHTRecord(b"\x02" * 20, rec.subkey, rec.value, rec.expiration_time))
    assert not v.validate(DHTRecord(rec.key, rec.subkey, rec.value, rec.expiration_time + 1))


def test_schema_plain_values_and_horizon() -> None:
    v = SignedRecordValidator(None, max_ttl=600)
    assert not v.validate(signed(ALICE, ALICE.peer_id, pack(b"not a record")))
    assert not v.validate(signed(ALICE, ALICE.peer_id, b"\xc1"))  # not even msgpack
    plain = DHTRecord(KEY, pack(None), b"whatever", time.time() + 60)  # hivemind's "no subkey"
    assert not v.validate(plain)
    assert not v.validate(DHTRecord(KEY, pack(ALICE.peer_id), b"unsigned", time.time() + 60))
    assert not v.validate(signed(ALICE, ALICE.peer_id, server_record(ALICE.peer_id), time.time() + 3600))
    assert v.strip_value(DHTRecord(KEY, pack(ALICE.peer_id), b"garbage", 0.0)) == pack(None)


def test_sign_value_uses_the_node_key() -> None:
    v = SignedRecordValidator(ALICE)
    raw = DHTRecord(KEY, pack(ALICE.peer_id), server_record(ALICE.peer_id), time.time() + 60)
    rec = DHTRecord(raw.key, raw.subkey, v.sign_value(raw), raw.expiration_time)
    assert SignedRecordValidator(None).validate(rec)
    assert SignedRecordValidator(None).sign_value(raw) == raw.value  # a key-less node cannot sign


def report_record(reporter: str) -> bytes:
    from meshinfer.wire.records import ReportRecord

    return pack(encode_record(ReportRecord(
        reporter=reporter, accused="QmAccused", model_id="m", span=BlockRange(0, 2), session_id="s", quant="none",
        dtype="float32", commit_steps=16, commit_head=b"h" * 32, commit_signature=b"s", accused_key=b"k",
        window_start=0, window_end=4, blob_sha256=b"b" * 32, blob_size=10)))


def test_reports_only_under_their_reporters_subkey() -> None:
    v = SignedRecordValidator(None)
    assert v.validate(signed(ALICE, f"{ALICE.peer_id}/r1", report_record(ALICE.peer_id)))
    # Mallory cannot publish in Alice's name: not under Alice's subkey, nor a report naming Alice under its own
    assert not v.validate(signed(MALLORY, f"{ALICE.peer_id}/r1", report_record(ALICE.peer_id)))
    assert not v.validate(signed(MALLORY, f"{MALLORY.peer_id}/r1", report_record(ALICE.peer_id)))
