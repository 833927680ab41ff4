"""Private swarms without processes: the key file, sealed DHT values, stream proofs and the direct plane's hellos."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from pathlib import Path

import pytest
from hivemind.dht.validation import DHTRecord

from meshinfer.cli.main import main as cli_main
from meshinfer.errors import ConfigError, TransportError
from meshinfer.p2p.direct import DirectPlane
from meshinfer.p2p.identity import Identity
from meshinfer.p2p.membership import (
    KEY_HEADER,
    PREAMBLE_BYTES,
    PUBLIC_KEY_ID,
    SwarmKey,
    load_swarm_key,
    new_key_line,
    parse_key_line,
    refusal,
)
from meshinfer.p2p.privateswarm import MEMBER_PROTOCOL, public_preamble, verdict
from meshinfer.p2p.signing import record_validator
from meshinfer.p2p.stream import DEFAULT_SETTINGS, MessageStream
from meshinfer.wire.messages import Ping, Pong

KEY = parse_key_line(new_key_line())
OTHER = parse_key_line(new_key_line())
IDS = [Identity.generate() for _ in range(3)]
PROTO = "/meshinfer/test-echo/1"
EXPIRES = time.time() + 600


# --- the key file ---------------------------------------------------------------------------------

def test_key_line_round_trip_and_ids() -> None:
    line = new_key_line()
    header, b64 = line.split()
    assert header == KEY_HEADER and len(base64.b64decode(b64)) == 32
    a, b = parse_key_line(line), parse_key_line(line + "\n")
    assert a.key_id == b.key_id != PUBLIC_KEY_ID and len(a.label) == 16
    assert KEY.key_id != OTHER.key_id
    assert b64 not in repr(a)  # the secret is never shown


@pytest.mark.parametrize(("text", "match"), [
    ("", "not a swarm key file"),
    ("meshinfer-swarm-key/2 AAAA", "not a swarm key file"),
    (f"{KEY_HEADER} not*base64", "not valid base64"),
    (f"{KEY_HEADER} {base64.b64encode(b'short').decode()}", "holds 5 bytes, expected 32"),
    (f"{KEY_HEADER} a b", "not a swarm key file"),
])
def test_bad_key_lines_are_one_line_config_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_key_line(text)
    assert "\n" not in str(info.value) and "--swarm-key" in str(info.value)


def test_key_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"no such file.*swarm-key new"):
        load_swarm_key(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_swarm_key(tmp_path)
    out = tmp_path / "swarm.key"
    assert cli_main(["swarm-key", "new", "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert cli_main(["swarm-key", "new", "--out", str(out)]) == 2  # never overwritten
    with caplog.at_level(logging.WARNING, logger="meshinfer.p2p.membership"):
        key = load_swarm_key(out)
    assert not caplog.records
    os.chmod(out, 0o644)
    with caplog.at_level(logging.WARNING, logger="meshinfer.p2p.membership"):
        assert load_swarm_key(out).key_id == key.key_id
    assert any("readable by other users" in r.getMessage() for r in caplog.records)


def test_swarm_key_new_prints_a_usable_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["swarm-key", "new"]) == 0
    line = capsys.readouterr().out
    (tmp_path / "k").write_text(line)
    os.chmod(tmp_path / "k", 0o600)
    assert cli_main(["swarm-key", "id", str(tmp_path / "k")]) == 0
    assert capsys.readouterr().out.strip() == parse_key_line(line).label


# --- sealed DHT values ----------------------------------------------------------------------------

def test_seal_opens_only_with_the_key_at_its_key_and_subkey() -> None:
    sealed = KEY.seal(b"value", b"k", b"s")
    assert b"value" not in sealed
    assert KEY.unseal(sealed, b"k", b"s") == b"value"
    assert KEY.unseal(sealed, b"k2", b"s") is None  # moved to another key
    assert KEY.unseal(sealed, b"k", b"s2") is None  # or subkey
    assert OTHER.unseal(sealed, b"k", b"s") is None
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert KEY.unseal(tampered, b"k", b"s") is None
    assert KEY.unseal(b"", b"k", b"s") is None
    assert KEY.dht_key("servers:abc") != OTHER.dht_key("servers:abc") != "servers:abc"
    assert KEY.dht_key("servers:abc") == KEY.dht_key("servers:abc")


def _signed_record(identity: Identity, validator_key: SwarmKey | None) -> tuple[DHTRecord, bytes]:
    from meshinfer.p2p.signing import make_subkey
    from meshinfer.wire.records import SeedRecord, encode_record

    record = SeedRecord(peer_id=identity.peer_id, model_id="0" * 32, num_blocks=1, blocks=[], client_part=True,
                        files=True, addresses=[])
    subkey = _msgpack(make_subkey(identity.peer_id))
    raw = DHTRecord(b"key", subkey, _msgpack(encode_record(record)), EXPIRES)
    value = record_validator(identity, swarm_key=validator_key).sign_value(raw)
    return raw, value


def _msgpack(obj: object) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(obj)


def test_record_validator_admits_only_values_sealed_by_the_swarm() -> None:
    member = record_validator(None, swarm_key=KEY)
    public = record_validator(None)
    raw, sealed = _signed_record(IDS[0], KEY)
    ok = DHTRecord(raw.key, raw.subkey, sealed, raw.expiration_time)
    assert member.validate(ok)
    assert member.strip_value(ok) == raw.value  # readers see the payload
    assert not public.validate(ok)  # an outsider cannot read it: not even an envelope to it
    raw1, plain = _signed_record(IDS[1], None)  # an outsider's correctly signed record
    outsiders = DHTRecord(raw1.key, raw1.subkey, plain, raw1.expiration_time)
    assert public.validate(outsiders)
    assert not member.validate(outsiders)  # members refuse it
    _, other = _signed_record(IDS[0], OTHER)  # another private swarm's
    assert not member.validate(DHTRecord(raw.key, raw.subkey, other, raw.expiration_time))
    assert not member.validate(DHTRecord(b"another key", raw.subkey, sealed, raw.expiration_time))


# --- stream proofs --------------------------------------------------------------------------------

def test_preamble_is_bound_to_protocol_and_both_peers() -> None:
    a, b, c = (i.peer_id for i in IDS)
    pre = KEY.preamble(PROTO, a, b)
    assert len(pre) == PREAMBLE_BYTES
    assert verdict(KEY, pre, PROTO, a, b) == ""
    assert "bad membership proof" in verdict(KEY, pre, PROTO, c, b)  # replayed by another opener
    assert "bad membership proof" in verdict(KEY, pre, PROTO, a, c)  # or to another listener
    assert "bad membership proof" in verdict(KEY, pre, "/other/1", a, b)
    assert verdict(KEY, b"\xe7", PROTO, a, b) == "this swarm is private: join it with --swarm-key FILE (its key file)"
    assert verdict(KEY, OTHER.preamble(PROTO, a, b), PROTO, a, b) == "this swarm is private: your --swarm-key is " \
                                                                      "not its key"
    assert verdict(KEY, public_preamble(), MEMBER_PROTOCOL, a, b).startswith("this swarm is private: join it")
    assert verdict(None, public_preamble(), MEMBER_PROTOCOL, a, b) == ""
    assert "public swarm" in verdict(None, pre, PROTO, a, b)
    assert refusal(KEY, KEY.key_id) == "" and refusal(None, PUBLIC_KEY_ID) == ""


# --- the direct plane -----------------------------------------------------------------------------

async def _who(stream: MessageStream) -> None:
    async for msg in stream:
        if isinstance(msg, Ping):
            await stream.send(Pong(seq=msg.seq, payload=stream.peer_id.encode()))


@pytest.mark.parametrize(("listener_key", "dialer_key", "refused"), [
    (KEY, KEY, None),
    (KEY, None, "this swarm is private: join it with --swarm-key"),
    (KEY, OTHER, "this swarm is private: your --swarm-key is not its key"),
    (None, KEY, "this peer is in a public swarm"),
    (None, None, None),
])
def test_direct_hellos_carry_membership(listener_key: SwarmKey | None, dialer_key: SwarmKey | None,
                                        refused: str | None) -> None:
    async def main() -> None:
        plane = DirectPlane(IDS[0], swarm_key=listener_key)
        await plane.listen("127.0.0.1", 0)
        plane.handle(PROTO, _who, DEFAULT_SETTINGS)
        try:
            for addr in plane.addresses(["127.0.0.1"]):  # plain loopback and TLS
                dialer = DirectPlane(IDS[1], swarm_key=dialer_key)
                if refused is not None:
                    with pytest.raises(TransportError, match=refused):
                        await dialer.dial(IDS[0].peer_id, addr, PROTO, settings=DEFAULT_SETTINGS, timeout=5.0)
                    continue
                stream = await dialer.dial(IDS[0].peer_id, addr, PROTO, settings=DEFAULT_SETTINGS, timeout=5.0)
                reply = await stream.request(Ping(seq=1, payload=b""), timeout=5.0)
                assert isinstance(reply, Pong) and reply.payload == IDS[1].peer_id.encode()
                await stream.close()
        finally:
            await plane.close()

    asyncio.run(main())


# --- DHT RPCs ---------------------------------------------------------------------------------------

def test_dht_rpcs_carry_a_membership_mac() -> None:
    from hivemind.proto import dht_pb2

    from meshinfer.p2p.dhtauth import MAX_CLOCK_SKEW_S, SwarmAuthorizer

    async def main() -> None:
        member, other = SwarmAuthorizer(KEY), SwarmAuthorizer(OTHER)
        request = dht_pb2.FindRequest(keys=[b"k" * 20])
        await member.sign_request(request, None)
        assert await SwarmAuthorizer(KEY).validate_request(request)
        assert not await other.validate_request(request)  # another swarm
        assert not await SwarmAuthorizer(KEY).validate_request(dht_pb2.FindRequest(keys=[b"k" * 20]))  # unsigned
        server = SwarmAuthorizer(KEY)
        assert await server.validate_request(request)
        assert not await server.validate_request(request)  # replayed
        tampered = dht_pb2.FindRequest()
        tampered.CopyFrom(request)
        tampered.keys.append(b"x" * 20)
        assert not await SwarmAuthorizer(KEY).validate_request(tampered)
        late = SwarmAuthorizer(KEY, clock=lambda: time.time() + 2 * MAX_CLOCK_SKEW_S)
        assert not await late.validate_request(request)
        response = dht_pb2.FindResponse()
        await server.sign_response(response, request)
        assert await member.validate_response(response, request)
        assert not await other.validate_response(response, request)
        another = dht_pb2.FindRequest()
        await member.sign_request(another, None)
        assert not await member.validate_response(response, another)  # answers another request
        assert not await member.validate_response(None, request)

    asyncio.run(main())


def test_hellos_of_older_peers_decode_as_public() -> None:
    import msgspec

    from meshinfer.p2p.directhello import DIRECT_VERSION, Hello

    old = msgspec.msgpack.encode([DIRECT_VERSION, IDS[0].public_key, b"", "/p/1", b"n" * 32, ""])  # before issue 22
    hello = msgspec.msgpack.decode(old, type=Hello)
    assert hello.swarm == b"" and hello.member == b"" and hello.protocol == "/p/1"
    assert refusal(KEY, hello.swarm or PUBLIC_KEY_ID).startswith("this swarm is private")
