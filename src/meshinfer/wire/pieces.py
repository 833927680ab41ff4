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
for another version, ``LimitExceededError`` over a size bound), through ``wire.codec``; nothing is ever
pickled. Pure: no I/O.
"""

from __future__ import annotations

import enum
from typing import Annotated, Final, Literal

import msgspec

from meshinfer.wire.codec import Codec, failure_code, mismatch

PIECES_PROTOCOL: Final = "/meshinfer/pieces/1"
PIECES_VERSION: Final = 1
MAX_PIECE_BYTES: Final = 16 * 1024 * 1024
MAX_MANIFEST_BYTES: Final = 48 * 1024 * 1024


class PieceErrorCode(enum.StrEnum):
    """The closed set of ``PieceError.code`` values (their plain string values on the wire)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_PIECE = "unknown_piece"
    VERSION_MISMATCH = "version_mismatch"
    LIMIT_EXCEEDED = "limit_exceeded"
    INTERNAL = "internal"


PIECE_ERROR_CODES: Final = frozenset(code.value for code in PieceErrorCode)
"""Every ``PieceError.code`` value as a plain string."""


ModelIdText = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
ItemName = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
PieceIndex = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Kind = Literal["tensor", "file"]


class _Base(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class GetManifest(_Base, frozen=True, tag="get_manifest"):
    model_id: ModelIdText
    v: int = PIECES_VERSION


class ManifestData(_Base, frozen=True, tag="manifest"):
    model_id: ModelIdText
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_MANIFEST_BYTES)]
    v: int = PIECES_VERSION


class _PieceOf(_Base, frozen=True):
    """What a piece request and its answer both start with: which piece of which model (in wire order)."""

    model_id: ModelIdText
    kind: Kind
    name: ItemName
    index: PieceIndex


class GetPiece(_PieceOf, frozen=True, tag="get_piece"):
    v: int = PIECES_VERSION


class PieceData(_PieceOf, frozen=True, tag="piece"):
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_PIECE_BYTES)]
    v: int = PIECES_VERSION


class PieceError(_Base, frozen=True, tag="error"):
    code: Annotated[str, msgspec.Meta(max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=4096)]
    v: int = PIECES_VERSION


PieceMessage = GetManifest | ManifestData | GetPiece | PieceData | PieceError
PIECE_MESSAGE_TYPES: Final = (GetManifest, ManifestData, GetPiece, PieceData, PieceError)


_codec: Codec[PieceMessage] = Codec(
    PieceMessage, PIECE_MESSAGE_TYPES, version=PIECES_VERSION, kind="piece-protocol message",
    label="piece message", version_error=mismatch("pieces ", PIECES_VERSION), probe_version=True,
    length_limits=True,
)


def encode_piece_message(msg: PieceMessage) -> bytes:
    return _codec.encode(msg)


def decode_piece_message(data: bytes | memoryview) -> PieceMessage:
    """Decode and validate one message; raise WireError (or a subclass) for anything malformed."""
    return _codec.decode(data)


def piece_error_for(err: BaseException) -> PieceError:
    """The ``PieceError`` reporting a decoding failure ``err`` to the peer that caused it."""
    return PieceError(code=PieceErrorCode(failure_code(err)), message=(str(err) or type(err).__name__)[:4096])
