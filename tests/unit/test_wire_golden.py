"""The wire format byte for byte: every session message, piece message and DHT record encodes to exactly the
bytes recorded here (taken before the three codecs came to share one implementation, ``wire.codec``) and decodes
back to an equal value; malformed input fails with exactly the recorded error type and text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from meshinfer.errors import LimitExceededError, WireError
from meshinfer.types import BlockRange
from meshinfer.wire.messages import (
    Burst,
    ChainEntry,
    Close,
    Commit,
    Error,
    ErrorCode,
    Hop,
    Open,
    Opened,
    Ping,
    Pong,
    Retarget,
    Step,
    StepResult,
    decode_message,
    encode_message,
    error_message,
)
from meshinfer.wire.pieces import (
    GetManifest,
    GetPiece,
    ManifestData,
    PieceData,
    PieceError,
    PieceErrorCode,
    decode_piece_message,
    encode_piece_message,
)
from meshinfer.wire.records import ModelCard, ReportRecord, SeedRecord, ServerRecord, decode_record, encode_record
from meshinfer.wire.tensor import Tensor

MID = "0123456789abcdef0123456789abcdef"
T = Tensor(dtype="float32", shape=[1, 2], data=b"\x00\x00\x80?\x00\x00\x00@")
HOP = Hop(peer_id="Qm", span=BlockRange(2, 4), session_id="s2", maddrs=["/ip4/1.2.3.4/tcp/5"], direct=["/ip4/1/tcp/2"])
Codec = tuple[Callable[[Any], bytes], Callable[[bytes], Any]]
MSG: Codec = (encode_message, decode_message)
PIECE: Codec = (encode_piece_message, decode_piece_message)
RECORD: Codec = (encode_record, decode_record)

SAMPLES: list[tuple[Codec, Any]] = [
    (MSG, Open(session_id="s", model="m", span=BlockRange(0, 2), max_length=64, dtype="float32", route_tail=[HOP],
               quant="int8")),
    (MSG, Opened(session_id="s", span=BlockRange(0, 2), max_length=64)),
    (MSG, Step(session_id="s", step_id=3, position=7, hidden=T, burst=Burst(id=9, size=2))),
    (MSG, StepResult(session_id="s", step_id=3, hidden=T)),
    (MSG, Retarget(session_id="s", route_tail=[HOP])),
    (MSG, Close(session_id="s")),
    (MSG, Error(code=ErrorCode.OVERLOADED, message="busy", session_id="s", step_id=1)),
    (MSG, error_message(LimitExceededError("too big"), session_id="s")),
    (MSG, Ping(seq=1, payload=b"ab")),
    (MSG, Pong(seq=1)),
    (PIECE, GetManifest(model_id=MID)),
    (PIECE, ManifestData(model_id=MID, data=b"{}")),
    (PIECE, GetPiece(model_id=MID, kind="tensor", name="w", index=2)),
    (PIECE, PieceData(model_id=MID, kind="file", name="config.json", index=0, data=b"xy")),
    (PIECE, PieceError(code=PieceErrorCode.UNKNOWN_PIECE, message="no")),
    (RECORD, ModelCard(model_id=MID, name="tiny", family="llama", num_blocks=4, hidden_size=64, dtype="float32",
                       manifest_hash=MID)),  # a card's manifest hash is its model id (issue 17)
    (RECORD, ServerRecord(peer_id="Qm", model_id=MID, span=BlockRange(0, 4), state="online", throughput=1.5,
                          cache_tokens_left=100, addresses=["/ip4/1"], software_version="0.1",
                          direct_addresses=["/ip4/2"], sessions=2, quant="int4", weight_bytes=10,
                          device="NVIDIA H200", dtype="bfloat16",  # device and dtype: issue 18
                          reachability="relayed",  # issue 20
                          sealing_key="5e" * 32,  # issue 22
                          credit_to="Qx")),  # issue 23
    (RECORD, SeedRecord(peer_id="Qm", model_id=MID, num_blocks=4, blocks=[BlockRange(0, 2)], client_part=True,
                        files=False, addresses=["/ip4/1"])),
    (MSG, StepResult(session_id="s", step_id=3, hidden=T, commit=Commit(  # issue 19: signed commitments
        steps=16, head=b"h" * 32, signature=b"sig", public_key=b"pk",
        entries=[ChainEntry(3, 7, 1, b"i" * 32, b"o" * 32)]))),
    (RECORD, ReportRecord(reporter="Qr", accused="Qa", model_id=MID, span=BlockRange(0, 2), session_id="s",
                          quant="none", dtype="bfloat16", commit_steps=16, commit_head=b"h" * 32,
                          commit_signature=b"sig", accused_key=b"pk", window_start=0, window_end=16,
                          blob_sha256=b"b" * 32, blob_size=1000, addresses=["/ip4/1"])),
]

GOLDEN = [
    '8aa474797065a46f70656eaa73657373696f6e5f6964a173a56d6f64656ca16da47370616e82a5737461727400a3656e6402aa6d61785f6c656e67746840a56474797065a7666c6f61743332aa726f7574655f7461696c9185a7706565725f6964a2516da47370616e82a5737461727402a3656e6404aa73657373696f6e5f6964a27332a66d616464727391b22f6970342f312e322e332e342f7463702f35a664697265637491ac2f6970342f312f7463702f32a17601a57175616e74a4696e7438a9707265765f70656572c0',
    '85a474797065a66f70656e6564aa73657373696f6e5f6964a173a47370616e82a5737461727400a3656e6402aa6d61785f6c656e67746840a17601',
    '88a474797065a473746570aa73657373696f6e5f6964a173a7737465705f696403a8706f736974696f6e07a668696464656e83a56474797065a7666c6f61743332a57368617065920102a464617461c4080000803f00000040a17601a5627572737482a2696409a473697a6502ab77616e745f636f6d6d6974c2',
    '87a474797065ab737465705f726573756c74aa73657373696f6e5f6964a173a7737465705f696403a668696464656e83a56474797065a7666c6f61743332a57368617065920102a464617461c4080000803f00000040a17601a56275727374c0a6636f6d6d6974c0',
    '85a474797065a87265746172676574aa73657373696f6e5f6964a173aa726f7574655f7461696c9185a7706565725f6964a2516da47370616e82a5737461727402a3656e6404aa73657373696f6e5f6964a27332a66d616464727391b22f6970342f312e322e332e342f7463702f35a664697265637491ac2f6970342f312f7463702f32a17601a9707265765f70656572c0',
    '83a474797065a5636c6f7365aa73657373696f6e5f6964a173a17601',
    '86a474797065a56572726f72a4636f6465aa6f7665726c6f61646564a76d657373616765a462757379aa73657373696f6e5f6964a173a7737465705f696401a17601',
    '86a474797065a56572726f72a4636f6465ae6c696d69745f6578636565646564a76d657373616765a7746f6f20626967aa73657373696f6e5f6964a173a7737465705f6964c0a17601',
    '84a474797065a470696e67a373657101a77061796c6f6164c4026162a17601',
    '84a474797065a4706f6e67a373657101a77061796c6f6164c400a17601',
    '83a474797065ac6765745f6d616e6966657374a86d6f64656c5f6964d9203031323334353637383961626364656630313233343536373839616263646566a17601',
    '84a474797065a86d616e6966657374a86d6f64656c5f6964d9203031323334353637383961626364656630313233343536373839616263646566a464617461c4027b7da17601',
    '86a474797065a96765745f7069656365a86d6f64656c5f6964d9203031323334353637383961626364656630313233343536373839616263646566a46b696e64a674656e736f72a46e616d65a177a5696e64657802a17601',
    '87a474797065a57069656365a86d6f64656c5f6964d9203031323334353637383961626364656630313233343536373839616263646566a46b696e64a466696c65a46e616d65ab636f6e6669672e6a736f6ea5696e64657800a464617461c4027879a17601',
    '84a474797065a56572726f72a4636f6465ad756e6b6e6f776e5f7069656365a76d657373616765a26e6fa17601',
    '89a474797065aa6d6f64656c5f63617264a86d6f64656c5f6964d9203031323334353637383961626364656630313233343536373839616263646566a46e616d65a474696e79a666616d696c79a56c6c616d61aa6e756d5f626c6f636b7304ab68696464656e5f73697a6540a56474797065a7666c6f61743332ad6d616e69666573745f68617368d9203031323334353637383961626364656630313233343536373839616263646566a17601',
    'de0018a474797065a6736572766572a7706565725f6964a2516da86d6f64656c5f6964d9203031323334353637383961626364656630313233343536373839616263646566a47370616e82a5737461727400a3656e6404a57374617465a66f6e6c696e65aa7468726f756768707574cb3ff8000000000000b163616368655f746f6b656e735f6c65667464a961646472657373657391a62f6970342f31b0736f6674776172655f76657273696f6ea3302e31ab7075626c69635f6e616d65c0b06469726563745f61646472657373657391a62f6970342f32b070726f746f636f6c5f76657273696f6e01a873657373696f6e7302ac7175657565645f737465707300b062617463685f7468726f756768707574cb0000000000000000aa62617463685f73697a6500a57175616e74a4696e7434ac7765696768745f62797465730aa6646576696365ab4e56494449412048323030a56474797065a862666c6f61743136ac72656163686162696c697479a772656c61796564ab7365616c696e675f6b6579d94035653565356535653565356535653565356535653565356535653565356535653565356535653565356535653565356535653565356535653565356535653565a96372656469745f746fa25178a17601',
    '8ba474797065a473656564a7706565725f6964a2516da86d6f64656c5f6964d9203031323334353637383961626364656630313233343536373839616263646566aa6e756d5f626c6f636b7304a6626c6f636b739182a5737461727400a3656e6402ab636c69656e745f70617274c3a566696c6573c2a961646472657373657391a62f6970342f31b06469726563745f61646472657373657390b0736f6674776172655f76657273696f6ea0a17601',
    '87a474797065ab737465705f726573756c74aa73657373696f6e5f6964a173a7737465705f696403a668696464656e83a56474797065a7666c6f61743332a57368617065920102a464617461c4080000803f00000040a17601a56275727374c0a6636f6d6d697485a5737465707310a468656164c4206868686868686868686868686868686868686868686868686868686868686868a97369676e6174757265c403736967aa7075626c69635f6b6579c402706ba7656e74726965739195030701c4206969696969696969696969696969696969696969696969696969696969696969c4206f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f',
    'de0016a474797065a67265706f7274a87265706f72746572a25172a761636375736564a25161a86d6f64656c5f6964d9203031323334353637383961626364656630313233343536373839616263646566a47370616e82a5737461727400a3656e6402aa73657373696f6e5f6964a173a57175616e74a46e6f6e65a56474797065a862666c6f61743136ac636f6d6d69745f737465707310ab636f6d6d69745f68656164c4206868686868686868686868686868686868686868686868686868686868686868b0636f6d6d69745f7369676e6174757265c403736967ab616363757365645f6b6579c402706bac77696e646f775f737461727400aa77696e646f775f656e6410ab626c6f625f736861323536c4206262626262626262626262626262626262626262626262626262626262626262a9626c6f625f73697a65cd03e8a961646472657373657391a62f6970342f31b06469726563745f61646472657373657390ae76657269666965725f6474797065a0ad616363757365645f6474797065a0a763726561746564cb0000000000000000a17601',
]


@pytest.mark.parametrize(("sample", "golden"), list(zip(SAMPLES, GOLDEN, strict=True)))
def test_encoding_is_byte_identical(sample: tuple[Codec, Any], golden: str) -> None:
    (encode, decode), value = sample
    assert encode(value).hex() == golden
    assert decode(bytes.fromhex(golden)) == value


OLD_SERVER_RECORD = bytes.fromhex(
    'de0013a474797065a6736572766572a7706565725f6964a2516da86d6f64656c5f6964d9203031323334353637383961626364656630'
    '313233343536373839616263646566a47370616e82a5737461727400a3656e6404a57374617465a66f6e6c696e65aa7468726f756768'
    '707574cb3ff8000000000000b163616368655f746f6b656e735f6c65667464a961646472657373657391a62f6970342f31b0736f6674'
    '776172655f76657273696f6ea3302e31ab7075626c69635f6e616d65c0b06469726563745f61646472657373657391a62f6970342f32'
    'b070726f746f636f6c5f76657273696f6e01a873657373696f6e7302ac7175657565645f737465707300b062617463685f7468726f75'
    '6768707574cb0000000000000000aa62617463685f73697a6500a57175616e74a4696e7434ac7765696768745f62797465730aa17601'
)
"""A record of a server from before issue 18 (no ``device``/``dtype`` keys), byte for byte as it was announced."""


def test_records_without_device_and_dtype_still_decode() -> None:
    record = decode_record(OLD_SERVER_RECORD)
    assert isinstance(record, ServerRecord)
    assert (record.device, record.dtype, record.quant, record.weight_bytes) == ("cpu", "float32", "int4", 10)
    assert record == msgspec.structs.replace(SAMPLES[16][1], device="cpu", dtype="float32", reachability="public",
                                             sealing_key="", credit_to=None)


ISSUE18_SERVER_RECORD = bytes.fromhex(
    'de0015a474797065a6736572766572a7706565725f6964a2516da86d6f64656c5f6964d920303132333435363738396162636465663031'
    '3233343536373839616263646566a47370616e82a5737461727400a3656e6404a57374617465a66f6e6c696e65aa7468726f7567687075'
    '74cb3ff8000000000000b163616368655f746f6b656e735f6c65667464a961646472657373657391a62f6970342f31b0736f6674776172'
    '655f76657273696f6ea3302e31ab7075626c69635f6e616d65c0b06469726563745f61646472657373657391a62f6970342f32b070726f'
    '746f636f6c5f76657273696f6e01a873657373696f6e7302ac7175657565645f737465707300b062617463685f7468726f756768707574'
    'cb0000000000000000aa62617463685f73697a6500a57175616e74a4696e7434ac7765696768745f62797465730aa6646576696365ab4e'
    '56494449412048323030a56474797065a862666c6f61743136a17601'
)
"""A server record from before issue 20 (no ``reachability`` key), byte for byte as it was announced."""


def test_records_without_reachability_decode_as_public() -> None:
    record = decode_record(ISSUE18_SERVER_RECORD)
    assert isinstance(record, ServerRecord)
    assert record.reachability == "public"
    assert record == msgspec.structs.replace(SAMPLES[16][1], reachability="public", sealing_key="", credit_to=None)


ISSUE20_SERVER_RECORD = bytes.fromhex(
    'de0016a474797065a6736572766572a7706565725f6964a2516da86d6f64656c5f6964d920303132333435363738396162636465663031'
    '3233343536373839616263646566a47370616e82a5737461727400a3656e6404a57374617465a66f6e6c696e65aa7468726f7567687075'
    '74cb3ff8000000000000b163616368655f746f6b656e735f6c65667464a961646472657373657391a62f6970342f31b0736f6674776172'
    '655f76657273696f6ea3302e31ab7075626c69635f6e616d65c0b06469726563745f61646472657373657391a62f6970342f32b070726f'
    '746f636f6c5f76657273696f6e01a873657373696f6e7302ac7175657565645f737465707300b062617463685f7468726f756768707574'
    'cb0000000000000000aa62617463685f73697a6500a57175616e74a4696e7434ac7765696768745f62797465730aa6646576696365ab4e'
    '56494449412048323030a56474797065a862666c6f61743136ac72656163686162696c697479a772656c61796564a17601'
)
"""A server record from before issue 22 (no ``sealing_key``), byte for byte as it was announced."""


def test_records_without_sealing_key_take_no_sealed_requests() -> None:
    record = decode_record(ISSUE20_SERVER_RECORD)
    assert isinstance(record, ServerRecord)
    assert record.sealing_key == ""
    assert record == msgspec.structs.replace(SAMPLES[16][1], sealing_key="", credit_to=None)


@pytest.mark.parametrize("key", ["ab" * 31, "AB" * 32, "zz" * 32, "ab" * 33])
def test_a_sealing_key_is_64_lowercase_hex(key: str) -> None:
    bad = msgspec.structs.replace(SAMPLES[16][1], sealing_key=key)
    with pytest.raises(WireError, match=r"sealing[ _]key"):
        decode_record(msgspec.msgpack.encode(bad))


enc = msgspec.msgpack.encode
BAD: list[tuple[Callable[[bytes], Any], bytes]] = [
    (decode_message, b"\xc1"),
    (decode_message, enc({"type": "close", "session_id": "s", "v": 2})),
    (decode_message, enc({"type": "close", "v": 2})),
    (decode_message, enc({"type": "nope", "v": 1})),
    (decode_message, enc({"type": "ping", "seq": 1, "payload": b"x" * 70_000_000, "v": 1})),
    (decode_piece_message, b"\xc1"),
    (decode_piece_message, enc({"type": "get_manifest", "model_id": "0" * 32, "v": 3})),
    (decode_piece_message, enc({"type": "get_manifest", "v": 3})),
    (decode_piece_message, enc({"type": "piece", "model_id": "0" * 32, "kind": "file", "name": "a", "index": 0,
                                "data": b"x" * (16 * 1024 * 1024 + 1), "v": 1})),
    (decode_record, b"\xc1"),
    (decode_record, enc({"type": "model_card", "model_id": "m", "name": "n", "family": "f", "num_blocks": 1,
                         "hidden_size": 1, "dtype": "float32", "v": 2})),
    (decode_record, enc({"type": "model_card", "model_id": "m", "name": "n", "family": "f", "num_blocks": 1,
                         "hidden_size": 1, "dtype": "int3", "v": 1})),
]

OUTCOMES = [
    ('WireError', "malformed message: MessagePack data is malformed: invalid opcode '\\xc1' (byte 0)"),
    ('VersionMismatchError', 'peer speaks protocol version 2, this peer speaks 1'),
    ('VersionMismatchError', 'peer speaks protocol version 2, this peer speaks 1'),
    ('WireError', "malformed message: Invalid value 'nope' - at `$.type`"),
    ('LimitExceededError', 'ping payload of 70000000 bytes exceeds 67108864'),
    ('WireError', "malformed piece message: MessagePack data is malformed: invalid opcode '\\xc1' (byte 0)"),
    ('VersionMismatchError', 'peer speaks pieces protocol version 3, this peer speaks 1'),
    ('VersionMismatchError', 'peer speaks pieces protocol version 3, this peer speaks 1'),
    ('LimitExceededError', 'piece message over a size limit: Expected `bytes` of length <= 16777216 - at `$.data`'),
    ('WireError', "malformed DHT record: MessagePack data is malformed: invalid opcode '\\xc1' (byte 0)"),
    ('WireError', 'DHT record version 2, this peer reads version 1'),
    ('WireError', "model card dtype 'int3' is not one of float32, float16, bfloat16"),
]


@pytest.mark.parametrize(("bad", "outcome"), list(zip(BAD, OUTCOMES, strict=True)))
def test_malformed_input_fails_as_before(bad: tuple[Callable[[bytes], Any], bytes], outcome: tuple[str, str]) -> None:
    decode, data = bad
    with pytest.raises(Exception) as info:  # the exact type is checked below
        decode(data)
    assert (type(info.value).__name__, str(info.value)) == outcome


OLD_STEP_RESULT = bytes.fromhex(
    '86a474797065ab737465705f726573756c74aa73657373696f6e5f6964a173a7737465705f696403a668696464656e83a56474797065a7'
    '666c6f61743332a57368617065920102a464617461c4080000803f00000040a17601a56275727374c0'
)
"""A ``StepResult`` of a server from before issue 19 (no ``commit`` key), byte for byte."""


def test_step_results_without_commit_still_decode() -> None:
    assert decode_message(OLD_STEP_RESULT) == StepResult(session_id="s", step_id=3, hidden=T, commit=None)


OLD_STEP = bytes.fromhex(
    '87a474797065a473746570aa73657373696f6e5f6964a173a7737465705f696403a8706f736974696f6e07a668696464656e83a564747970'
    '65a7666c6f61743332a57368617065920102a464617461c4080000803f00000040a17601a5627572737482a2696409a473697a6502'
)
"""A ``Step`` of a client from before issue 19 (no ``want_commit`` key), byte for byte."""


def test_steps_without_want_commit_still_decode() -> None:
    assert decode_message(OLD_STEP) == Step(session_id="s", step_id=3, position=7, hidden=T, burst=Burst(id=9, size=2))


PRE_ISSUE_23 = (
    "de0017a474797065a6736572766572a7706565725f6964a2516da86d6f64656c5f6964d92030313233343536373839616263"
    "64656630313233343536373839616263646566a47370616e82a5737461727400a3656e6404a57374617465a66f6e6c696e65"
    "aa7468726f756768707574cb3ff8000000000000b163616368655f746f6b656e735f6c65667464a961646472657373657391"
    "a62f6970342f31b0736f6674776172655f76657273696f6ea3302e31ab7075626c69635f6e616d65c0b06469726563745f61"
    "646472657373657391a62f6970342f32b070726f746f636f6c5f76657273696f6e01a873657373696f6e7302ac7175657565"
    "645f737465707300b062617463685f7468726f756768707574cb0000000000000000aa62617463685f73697a6500a5717561"
    "6e74a4696e7434ac7765696768745f62797465730aa6646576696365ab4e56494449412048323030a56474797065a862666c"
    "6f61743136ac72656163686162696c697479a772656c61796564ab7365616c696e675f6b6579d94035653565356535653565"
    "3565356535653565356535653565356535653565356535653565356535653565356535653565356535653565356535653565"
    "35653565a17601"
)
"""A server record from before issue 23 (no ``credit_to``), byte for byte as it was announced."""


def test_records_without_credit_to_still_decode() -> None:
    (_, decode), value = SAMPLES[16]
    assert decode(bytes.fromhex(PRE_ISSUE_23)) == msgspec.structs.replace(value, credit_to=None)
