"""Typed, versioned messages of the weight-piece protocol (``/meshinfer/pieces/1``, issue 9).

Contract: every message is a frozen msgspec Struct in the tagged union ``PieceMessage`` (tag field ``type``)
carrying ``v`` = ``PIECES_VERSION``; it is a protocol of its own, separate from the session messages of
``meshinfer.wire.messages``. A fetching peer asks a seeder, on one stream, any number of times in turn::

    GetManifest(model_id)                     -> ManifestData(model_id, data)   (canonical manifest bytes)
    GetPiece(model_id, kind, name, index)     -> PieceData(model_id, kind, name, index, data)
    anything wrong                            -> PieceError(code, message)      (the stream stays usable)

``kind`` is ``tensor`` (a tensor of the manifest by name) or ``file`` (a small file: config, tokenizer...);
``index`` counts ``piece_size`` pieces of its bytes. Model ids are 32 lowercase hex characters. Limits are
part of the schema (names, piece and manifest sizes) and the stream carrying these messages has already
bounded the whole message before it was read (``WireLimits.max_message_bytes``), so decoding allocates no
more than what was received. ``decode_piece_message`` raises only ``WireError`` (``VersionMismatchError``
for another version); nothing is ever pickled. Pure: no I/O.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from meshinfer.errors import LimitExceededError, MeshinferError, WireError
from meshinfer.wire.messages import VersionMismatchError

PIECES_PROTOCOL: Final = "/meshinfer/pieces/1"
PIECES_VERSION: Final = 1
MAX_PIECE_BYTES: Final = 16 * 1024 * 1024
MAX_MANIFEST_BYTES: Final = 48 * 1024 * 1024


class PieceErrorCode:
    """The closed set of ``PieceError.code`` values."""

    BAD_REQUEST: Final = "bad_request"
    UNKNOWN_MODEL: Final = "unknown_model"
    UNKNOWN_PIECE: Final = "unknown_piece"
    VERSION_MISMATCH: Final = "version_mismatch"
    LIMIT_EXCEEDED: Final = "limit_exceeded"
    INTERNAL: Final = "internal"

    ALL: Final = frozenset({"bad_request", "unknown_model", "unknown_piece", "version_mismatch",
                            "limit_exceeded", "internal"})


ModelIdText = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
ItemName = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
PieceIndex = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Kind = Literal["tensor", "file"]


class _Base(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class GetManifest(_Base, tag="get_manifest"):
    model_id: ModelIdText
    v: int = PIECES_VERSION


class ManifestData(_Base, tag="manifest"):
    model_id: ModelIdText
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_MANIFEST_BYTES)]
    v: int = PIECES_VERSION


class GetPiece(_Base, tag="get_piece"):
    model_id: ModelIdText
    kind: Kind
    name: ItemName
    index: PieceIndex
    v: int = PIECES_VERSION


class PieceData(_Base, tag="piece"):
    model_id: ModelIdText
    kind: Kind
    name: ItemName
    index: PieceIndex
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_PIECE_BYTES)]
    v: int = PIECES_VERSION


class PieceError(_Base, tag="error"):
    code: Annotated[str, msgspec.Meta(max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=4096)]
    v: int = PIECES_VERSION


PieceMessage = GetManifest | ManifestData | GetPiece | PieceData | PieceError
PIECE_MESSAGE_TYPES: Final = (GetManifest, ManifestData, GetPiece, PieceData, PieceError)


class _VersionProbe(msgspec.Struct):
    v: int = PIECES_VERSION


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(PieceMessage)
_probe = msgspec.msgpack.Decoder(_VersionProbe)


def encode_piece_message(msg: PieceMessage) -> bytes:
    if not isinstance(msg, PIECE_MESSAGE_TYPES):
        raise WireError(f"not a piece-protocol message: {type(msg).__name__}")
    return _encoder.encode(msg)


def decode_piece_message(data: bytes | memoryview) -> PieceMessage:
    """Decode and validate one message; raise WireError (or a subclass) for anything malformed."""
    try:
        msg = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, MeshinferError, ValueError, TypeError,
            OverflowError, RecursionError) as err:
        try:
            version = _probe.decode(data).v
        except Exception:
            version = None
        if version is not None and version != PIECES_VERSION:
            raise VersionMismatchError(
                f"peer speaks pieces protocol version {version}, this peer speaks {PIECES_VERSION}") from None
        if "length" in str(err) and "<=" in str(err):
            raise LimitExceededError(f"piece message over a size limit: {str(err)[:200]}") from None
        raise WireError(f"malformed piece message: {str(err)[:200]}") from None
    if msg.v != PIECES_VERSION:
        raise VersionMismatchError(f"peer speaks pieces protocol version {msg.v}, this peer speaks {PIECES_VERSION}")
    return msg


def piece_error_for(err: BaseException) -> PieceError:
    """The ``PieceError`` reporting a decoding failure ``err`` to the peer that caused it."""
    if isinstance(err, VersionMismatchError):
        code = PieceErrorCode.VERSION_MISMATCH
    elif isinstance(err, LimitExceededError):
        code = PieceErrorCode.LIMIT_EXCEEDED
    elif isinstance(err, WireError):
        code = PieceErrorCode.BAD_REQUEST
    else:
        code = PieceErrorCode.INTERNAL
    return PieceError(code=code, message=(str(err) or type(err).__name__)[:4096])
