"""Messages of sealed requests to a full node (``/meshinfer/sealed/1``) and of their relay
(``/meshinfer/sealed-relay/1``), issue 22: what travels in the clear and what is sealed inside.

Contract: two protocols of their own (like ``wire.pieces``), typed and versioned through ``wire.codec``. In the
clear (what any relay, gateway host or network observer sees)::

    client -> SealedOpen(model_id, server_key, blob)      full node -> SealedFrame(data) ... (the last one flagged)
    anything refused before a frame                        -> SealedRefusal(code, message)
    client -> relay: RelayOpen(target, maddrs, direct, open)  relay -> the full node's messages, byte for byte

``blob`` is ``wire.sealing.seal_request`` of a ``RequestBody``; each ``SealedFrame.data`` is a
``ResponseSealer`` frame of a ``TokensOut``. Refusals in the clear carry no content of the request (they are
decided before it is opened, or say only that it did not open or was a replay); everything about the generation
itself, errors included, travels sealed (``TokensOut.error``). Token ids are packed as fixed-width u32
(``pack_ids``), so a frame's size depends on how many tokens it holds, never on which. Sizes are bounded by the
schema (``MAX_SEALED_BYTES``, ``MAX_FRAME_BYTES``, ``MAX_PROMPT_TOKENS``, ``MAX_LOGIT_BIAS``...), enforced while
decoding; a body using issue 24's sampling fields is version ``BODY_SAMPLING_VERSION``. Pure: no I/O,
never pickles.
"""

from __future__ import annotations

import array
import enum
import sys
from typing import Annotated, Final

import msgspec

from meshinfer.errors import WireError
from meshinfer.wire.codec import Codec, mismatch

SEALED_PROTOCOL: Final = "/meshinfer/sealed/1"
SEALED_RELAY_PROTOCOL: Final = "/meshinfer/sealed-relay/1"
SEALED_VERSION: Final = 1
MAX_PROMPT_TOKENS: Final = 131072
MAX_NEW_TOKENS: Final = 131072
MAX_STOP_IDS: Final = 256
MAX_LOGIT_BIAS: Final = 1024
"""The most (token id, bias) pairs of a request's ``logit_bias`` (``config.MAX_LOGIT_BIAS``)."""
BODY_SAMPLING_VERSION: Final = 2
"""``RequestBody.v`` of a body that sets any of issue 24's sampling fields (penalties, ``min_p``, ``logit_bias``):
a full node that predates them refuses it (another version) instead of silently sampling without them. Bodies
without them keep ``SEALED_VERSION``; this peer reads both."""
MAX_SEALED_BYTES: Final = 4 * MAX_PROMPT_TOKENS + 64 * 1024
"""Largest sealed request blob (the prompt's ids, the settings, padding, HPKE's enc and tag)."""
MAX_FRAME_BYTES: Final = 64 * 1024
MAX_TOKENS_PER_FRAME: Final = 256
REQUEST_ID_BYTES: Final = 16


class SealedCode(enum.StrEnum):
    """The closed set of ``SealedRefusal.code`` values."""

    BAD_REQUEST = "bad_request"
    NOT_SERVED = "not_served"
    """This peer does not serve sealed requests of that model now (not a full node, moved, or another key)."""
    UNSEALED = "cannot_open"
    """The blob failed authentication (tampered, or sealed for another server, model or key)."""
    REPLAYED = "replayed"
    OVERLOADED = "overloaded"
    UNREACHABLE = "unreachable"
    """A relay could not reach the target."""
    VERSION_MISMATCH = "version_mismatch"
    LIMIT_EXCEEDED = "limit_exceeded"
    INTERNAL = "internal"


PeerIdText = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
ModelIdText = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Maddr = Annotated[str, msgspec.Meta(max_length=512)]
Key = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_NEW_TOKENS)]


class _Base(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class SealedOpen(_Base, frozen=True, tag="sealed_open"):
    model_id: ModelIdText
    server_key: Key
    """The sealing key the blob was sealed to (a server with another key refuses at once: ``not_served``)."""
    blob: Annotated[bytes, msgspec.Meta(max_length=MAX_SEALED_BYTES)]
    v: int = SEALED_VERSION


class SealedFrame(_Base, frozen=True, tag="sealed_frame"):
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_FRAME_BYTES)]
    v: int = SEALED_VERSION


class SealedRefusal(_Base, frozen=True, tag="sealed_refusal"):
    code: Annotated[str, msgspec.Meta(max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=1024)]
    v: int = SEALED_VERSION


class RelayOpen(_Base, frozen=True, tag="relay_open"):
    """Ask a relay to forward ``open`` to ``target`` (reached at ``maddrs``/``direct`` when given) and the
    target's answers back."""

    target: PeerIdText
    open: SealedOpen
    maddrs: Annotated[list[Maddr], msgspec.Meta(max_length=16)] = []
    direct: Annotated[list[Maddr], msgspec.Meta(max_length=8)] = []
    v: int = SEALED_VERSION


SealedMessage = SealedOpen | SealedFrame | SealedRefusal | RelayOpen
SEALED_MESSAGE_TYPES: Final = (SealedOpen, SealedFrame, SealedRefusal, RelayOpen)

_codec: Codec[SealedMessage] = Codec(
    SealedMessage, SEALED_MESSAGE_TYPES, version=SEALED_VERSION, kind="sealed-protocol message",
    label="sealed message", version_error=mismatch("sealed ", SEALED_VERSION), probe_version=True,
    length_limits=True,
)


def encode_sealed(msg: SealedMessage) -> bytes:
    return _codec.encode(msg)


def decode_sealed(data: bytes | memoryview) -> SealedMessage:
    """Decode and validate one message; raise WireError (or a subclass) for anything malformed."""
    return _codec.decode(data)


# ---- inside the seal ----------------------------------------------------------------------------

PackedIds = Annotated[bytes, msgspec.Meta(max_length=4 * MAX_PROMPT_TOKENS)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]


class RequestBody(msgspec.Struct, frozen=True):
    """One generation, as the full node reads it once unsealed."""

    request_id: Annotated[bytes, msgspec.Meta(min_length=REQUEST_ID_BYTES, max_length=REQUEST_ID_BYTES)]
    timestamp: float
    """Seconds since the epoch when the client sealed it (the server refuses it outside its replay window)."""
    model_id: ModelIdText
    prompt: PackedIds
    """The prompt's token ids (``pack_ids``)."""
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_NEW_TOKENS)]
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0
    top_k: Count = 0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)] = 1.0
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    stop_ids: Annotated[bytes, msgspec.Meta(max_length=4 * MAX_STOP_IDS)] | None = None
    """Packed stop token ids; None: the model's eos ids."""
    tokens_per_frame: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_PER_FRAME)] = 1
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    logit_bias: Annotated[list[tuple[TokenId, Bias]], msgspec.Meta(max_length=MAX_LOGIT_BIAS)] = []
    """(token id, bias) pairs added to the raw logits (``SamplingConfig.logit_bias``)."""
    v: int = SEALED_VERSION


class TokensOut(msgspec.Struct, frozen=True):
    """One response frame's content: the next tokens, and on the last frame why the generation ended."""

    tokens: Annotated[bytes, msgspec.Meta(max_length=4 * MAX_TOKENS_PER_FRAME)] = b""
    done: bool = False
    error: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    """Set on a last frame when the generation failed (e.g. the context is too long)."""
    error_code: Annotated[str, msgspec.Meta(max_length=64)] = ""


_body_decoder = msgspec.msgpack.Decoder(RequestBody)
_out_decoder = msgspec.msgpack.Decoder(TokensOut)
_encoder = msgspec.msgpack.Encoder()


def encode_body(body: RequestBody | TokensOut) -> bytes:
    return _encoder.encode(body)


def decode_body(data: bytes) -> RequestBody:
    """A request body from unsealed bytes; ``WireError`` when malformed or of another version."""
    try:
        body = _body_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise WireError(f"malformed sealed request body: {str(err)[:200]}") from None
    if body.v not in (SEALED_VERSION, BODY_SAMPLING_VERSION):
        raise WireError(f"sealed request version {body.v}, this peer reads {SEALED_VERSION} and "
                        f"{BODY_SAMPLING_VERSION}")
    if len(body.prompt) % 4 or not body.prompt or (body.stop_ids is not None and len(body.stop_ids) % 4):
        raise WireError("sealed request ids are not whole u32 values (or the prompt is empty)")
    return body


def decode_out(data: bytes) -> TokensOut:
    try:
        out = _out_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise WireError(f"malformed sealed frame content: {str(err)[:200]}") from None
    if len(out.tokens) % 4:
        raise WireError("sealed frame ids are not whole u32 values")
    return out


def pack_ids(ids: list[int]) -> bytes:
    """Token ids as little-endian u32 (each id in 0..2**32-1)."""
    packed = array.array("I", ids)
    if packed.itemsize != 4:  # pragma: no cover - every platform CPython runs on has 4-byte unsigned int
        raise WireError("this platform's C unsigned int is not 4 bytes")
    if sys.byteorder != "little":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def unpack_ids(data: bytes) -> list[int]:
    packed = array.array("I")
    packed.frombytes(data)
    if sys.byteorder != "little":  # pragma: no cover
        packed.byteswap()
    return packed.tolist()
