"""Sealed requests' cryptography and messages (``wire.sealing``, ``wire.sealed``), pure: the HPKE suite against RFC
9180's published vector, requests bound to their server/model/key, response frames that cannot be altered,
dropped, reordered, replayed or cut short, the replay memory, and sizes that do not depend on token values."""

from __future__ import annotations

import os

import msgspec
import pytest

from meshinfer.errors import LimitExceededError, WireError
from meshinfer.wire.sealed import (
    RelayOpen,
    RequestBody,
    SealedFrame,
    SealedOpen,
    SealedRefusal,
    TokensOut,
    decode_body,
    decode_out,
    decode_sealed,
    encode_body,
    encode_sealed,
    pack_ids,
    unpack_ids,
)
from meshinfer.wire.sealing import (
    ENC_BYTES,
    FRAME_PAD,
    REQUEST_PAD,
    ReplayError,
    ReplayGuard,
    ResponseOpener,
    ResponseSealer,
    SealingError,
    SealingKey,
    open_request,
    response_key,
    seal_request,
    transcript,
)

PEER, MODEL = "QmServer", "0123456789abcdef0123456789abcdef"


def test_the_suite_is_rfc9180_a21() -> None:
    """DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, base mode: RFC 9180 A.2.1's first ciphertext opens
    with the suite ``wire.sealing`` uses (the vector has associated data, which only the library's test hook takes)."""
    from cryptography.hazmat.bindings._rust import openssl as rust_openssl
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from meshinfer.wire import sealing

    hook = getattr(rust_openssl.hpke, "_decrypt_with_aad", None)
    if hook is None:
        pytest.skip("this cryptography has no HPKE associated-data hook")
    sk = X25519PrivateKey.from_private_bytes(
        bytes.fromhex("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb"))
    assert sk.public_key().public_bytes_raw().hex() == (
        "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a")
    enc = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a"
    ct = "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28"
    info = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")  # "Ode on a Grecian Urn"
    got = hook(sealing._SUITE, bytes.fromhex(enc + ct), sk, info=info, aad=b"Count-0")
    assert got == b"Beauty is truth, truth beauty"


def _exchange(payload: bytes = b"hello") -> tuple[SealingKey, bytes, bytes, bytes]:
    key = SealingKey.generate()
    context = transcript(PEER, MODEL, key.public_bytes)
    blob, secret = seal_request(payload, key.public_bytes, context)
    return key, context, blob, secret


def test_request_round_trip_and_padding() -> None:
    key, context, blob, secret = _exchange(b"x" * 10)
    payload, got_secret = open_request(blob, key, context)
    assert (payload, got_secret) == (b"x" * 10, secret)
    sizes = {len(seal_request(b"y" * n, key.public_bytes, context)[0]) for n in (1, 100, 900)}
    assert len(sizes) == 1  # all pad to one REQUEST_PAD unit
    assert (next(iter(sizes)) - ENC_BYTES - 16) % REQUEST_PAD == 0


@pytest.mark.parametrize("where", [0, ENC_BYTES - 1, ENC_BYTES, -1])
def test_a_tampered_request_does_not_open(where: int) -> None:
    key, context, blob, _ = _exchange()
    bad = bytearray(blob)
    bad[where] ^= 0x01
    with pytest.raises(SealingError, match="failed authentication"):
        open_request(bytes(bad), key, context)
    with pytest.raises(SealingError):
        open_request(blob[:20], key, context)


def test_a_request_opens_only_for_its_server_model_and_key() -> None:
    key, _context, blob, _ = _exchange()
    for other in (transcript("QmOther", MODEL, key.public_bytes), transcript(PEER, "f" * 32, key.public_bytes)):
        with pytest.raises(SealingError):
            open_request(blob, key, other)
    stranger = SealingKey.generate()
    with pytest.raises(SealingError):
        open_request(blob, stranger, transcript(PEER, MODEL, stranger.public_bytes))


def _streams() -> tuple[ResponseSealer, ResponseOpener]:
    key, context, blob, secret = _exchange()
    _, server_secret = open_request(blob, key, context)
    enc = blob[:ENC_BYTES]
    return (ResponseSealer(response_key(server_secret, enc, context), context),
            ResponseOpener(response_key(secret, enc, context), context))


def test_frames_open_in_order_and_end_with_the_last() -> None:
    sealer, opener = _streams()
    frames = [sealer.seal(b"a"), sealer.seal(b"bb"), sealer.seal(b"", last=True)]
    assert [opener.open(f) for f in frames] == [b"a", b"bb", b""]
    assert opener.done
    with pytest.raises(SealingError, match="after the last"):
        opener.open(frames[0])
    with pytest.raises(SealingError, match="already ended"):
        sealer.seal(b"more")


@pytest.mark.parametrize("attack", ["flip", "drop", "reorder", "replay", "flag", "truncate", "other_stream"])
def test_altered_frame_streams_fail(attack: str) -> None:
    sealer, opener = _streams()
    frames = [sealer.seal(b"one"), sealer.seal(b"two"), sealer.seal(b"three", last=True)]
    if attack == "flip":
        frames[1] = frames[1][:-1] + bytes([frames[1][-1] ^ 1])
    elif attack == "drop":
        del frames[1]
    elif attack == "reorder":
        frames[0], frames[1] = frames[1], frames[0]
    elif attack == "replay":
        frames[1] = frames[0]
    elif attack == "flag":  # mark a middle frame as the last (cutting the stream short)
        frames[1] = b"\x01" + frames[1][1:]
    elif attack == "truncate":
        frames[1] = frames[1][:10]
    else:
        other_sealer, _ = _streams()
        frames[1] = other_sealer.seal(b"two")
    with pytest.raises(SealingError):
        for frame in frames:
            opener.open(frame)


def test_frame_sizes_do_not_depend_on_token_values() -> None:
    sealer, _ = _streams()
    small = sealer.seal(encode_body(TokensOut(tokens=pack_ids([1]))))
    big = sealer.seal(encode_body(TokensOut(tokens=pack_ids([2**31 + 5]))))
    assert len(small) == len(big)
    assert (len(small) - 1 - 16) % FRAME_PAD == 0


def test_replay_guard() -> None:
    now = [1000.0]
    guard = ReplayGuard(window_s=300.0, max_entries=6, clock=lambda: now[0])
    guard.check(b"id-1", b"enc-1", 1000.0)
    with pytest.raises(ReplayError, match="replay"):
        guard.check(b"id-1", b"enc-2", 1000.0)  # the same request id
    with pytest.raises(ReplayError, match="replay"):
        guard.check(b"id-2", b"enc-1", 1000.0)  # the same ephemeral key
    with pytest.raises(ReplayError, match="timestamp"):
        guard.check(b"id-3", b"enc-3", 1000.0 - 301)
    with pytest.raises(ReplayError, match="timestamp"):
        guard.check(b"id-3", b"enc-3", 1000.0 + 301)
    with pytest.raises(ReplayError, match="timestamp"):
        guard.check(b"id-3", b"enc-3", float("nan"))
    guard.check(b"id-4", b"enc-4", 1200.0)
    guard.check(b"id-5", b"enc-5", 900.0)
    with pytest.raises(ReplayError, match="limit"):
        guard.check(b"id-6", b"enc-6", 1000.0)  # 6 entries held: full, refuse rather than forget
    now[0] = 1301.0  # id-1 (forget at 1300) and id-5 (1300) expired; id-4 kept until 1500
    assert len(guard) == 6
    with pytest.raises(ReplayError, match="timestamp"):
        guard.check(b"id-1", b"enc-1", 1000.0)  # forgotten, but its timestamp is out of the window now
    assert len(guard) == 2
    with pytest.raises(ReplayError, match="replay"):
        guard.check(b"id-4", b"enc-9", 1200.0)


def test_messages_round_trip_and_bounds() -> None:
    body = RequestBody(request_id=os.urandom(16), timestamp=1.5, model_id=MODEL, prompt=pack_ids([1, 2, 300000]),
                       max_new_tokens=8, stop_ids=pack_ids([2]))
    assert decode_body(encode_body(body)) == body
    assert unpack_ids(body.prompt) == [1, 2, 300000]
    opened = SealedOpen(model_id=MODEL, server_key=b"k" * 32, blob=b"blob")
    for msg in (opened, SealedFrame(data=b"\x00abc"), SealedRefusal(code="replayed", message="no"),
                RelayOpen(target="QmTarget", open=opened, maddrs=["/ip4/1"])):
        assert decode_sealed(encode_sealed(msg)) == msg
    assert decode_out(encode_body(TokensOut(tokens=pack_ids([7]), done=True))).done
    with pytest.raises(WireError):
        decode_body(encode_body(msgspec.structs.replace(body, prompt=b"abc")))  # not whole u32 values
    with pytest.raises(WireError):
        decode_body(b"\xc1")
    with pytest.raises(LimitExceededError):
        decode_sealed(encode_sealed(SealedFrame(data=b"x" * (64 * 1024 + 1))))
    with pytest.raises(WireError):
        decode_sealed(encode_sealed(msgspec.structs.replace(opened, server_key=b"short")))


def test_full_nodes_are_online_whole_model_servers_with_a_key() -> None:
    from meshinfer.client.sealed import full_nodes
    from meshinfer.types import BlockRange
    from meshinfer.wire.records import ServerRecord

    def rec(peer: str, span: tuple[int, int] = (0, 4), *, state: str = "online", key: str = "ab" * 32,
            model: str = MODEL, throughput: float = 1.0) -> ServerRecord:
        return ServerRecord(peer_id=peer, model_id=model, span=BlockRange(*span), state=state,  # type: ignore[arg-type]
                            throughput=throughput, cache_tokens_left=10, addresses=[], software_version="t",
                            sealing_key=key)

    records = [rec("slow", throughput=1.0), rec("fast", throughput=9.0), rec("part", (0, 2)), rec("nokey", key=""),
               rec("draining", state="draining"), rec("other", model="f" * 32), rec("banned", throughput=99.0)]
    assert [r.peer_id for r in full_nodes(records, MODEL, 4, avoid={"banned"})] == ["fast", "slow", "banned"]
    assert full_nodes(records, MODEL, 5) == []


def test_every_sampling_setting_travels_sealed_and_stays_bounded() -> None:
    from meshinfer.client.sealed import request_body
    from meshinfer.config import SamplingConfig
    from meshinfer.errors import ConfigError
    from meshinfer.models.generator import GenerationParams

    sampling = SamplingConfig(temperature=0.7, presence_penalty=0.5, frequency_penalty=-1.0, min_p=0.1,
                              logit_bias=((5, -100.0), (9, 2.5)), seed=3)
    body = decode_body(encode_body(request_body([1, 2], GenerationParams(4, sampling, frozenset()), MODEL)))
    assert (body.presence_penalty, body.frequency_penalty, body.min_p) == (0.5, -1.0, 0.1)
    assert body.logit_bias == [(5, -100.0), (9, 2.5)] and body.stop_ids == b""  # ignore_eos: an empty stop set
    assert body.v == 2  # a full node that predates these fields refuses the body rather than ignore them
    assert decode_body(encode_body(request_body([1], GenerationParams(4, SamplingConfig()), MODEL))).v == 1
    with pytest.raises(WireError, match="version 3"):
        decode_body(encode_body(msgspec.structs.replace(body, v=3)))
    for bad in ({"min_p": 1.5}, {"presence_penalty": 3.0}, {"logit_bias": [(1, 101.0)]}, {"logit_bias": [(-1, 1.0)]},
                {"logit_bias": [(i, 1.0) for i in range(1025)]}):
        with pytest.raises(WireError):
            decode_body(encode_body(msgspec.structs.replace(body, **bad)))
    with pytest.raises(ConfigError, match="constrained decoding"):
        request_body([1], GenerationParams(4, sampling, None, constraint=lambda: None), MODEL)  # type: ignore[arg-type,return-value]
