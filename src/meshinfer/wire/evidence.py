"""Evidence against a server: the blob a report points to, and the ``meshinfer/evidence/1`` stream messages.

Contract (issue 19, shared design D5). An ``EvidenceBlob`` is what a client saw of one hop of one session: the
accused server's chain entries up to a signed commit (all of them, so anyone can recompute the signed head from
``p2p.commit.genesis``), the steps whose results the client used (``steps``: chain indices, in order, their
positions covering [0, end) without gaps), their inputs (the exact wire tensors whose sha256 the chain names) and
the claimed outputs of the steps that overlap the judged window [window_start, window_end). Encoded with msgpack, at
most ``MAX_EVIDENCE_BYTES``; its sha256 and size go into the ``ReportRecord`` (``wire.records``). The stream
protocol is one request, one answer: ``GetEvidence(sha256)`` -> ``EvidenceData(data)`` or ``EvidenceError``.
Decoding raises only ``WireError`` (and ``LimitExceededError``). Pure: no I/O, no torch.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from meshinfer.errors import LimitExceededError, WireError
from meshinfer.types import BlockRange
from meshinfer.wire.limits import MIB
from meshinfer.wire.messages import ChainEntry, Sha256
from meshinfer.wire.tensor import Tensor

EVIDENCE_PROTOCOL: Final = "/meshinfer/evidence/1"
MAX_EVIDENCE_BYTES: Final = 64 * MIB
"""Largest evidence blob stored, served or fetched (the inputs of a long session of a large model are big)."""
MAX_EVIDENCE_STEPS: Final = 65536
EVIDENCE_VERSION: Final = 1

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Index = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class EvidenceBlob(msgspec.Struct, frozen=True):
    model_id: Text
    span: BlockRange
    session_id: Text
    accused: Text
    public_key: Annotated[bytes, msgspec.Meta(max_length=1024)]
    """The accused's public key (it hashes to ``accused``)."""
    commit_steps: Index
    commit_head: Sha256
    commit_signature: Annotated[bytes, msgspec.Meta(max_length=1024)]
    entries: Annotated[list[ChainEntry], msgspec.Meta(max_length=MAX_EVIDENCE_STEPS)]
    steps: Annotated[list[Index], msgspec.Meta(max_length=MAX_EVIDENCE_STEPS)]
    """Chain indices of the steps replayed, in order."""
    inputs: Annotated[list[Tensor], msgspec.Meta(max_length=MAX_EVIDENCE_STEPS)]
    """The input of each of ``steps`` ([tokens, H] wire tensors)."""
    window_start: Index
    window_end: Index
    outputs: Annotated[list[Tensor], msgspec.Meta(max_length=MAX_EVIDENCE_STEPS)]
    """The claimed output of each of the last ``len(outputs)`` of ``steps`` (those overlapping the window)."""
    dtype: Annotated[str, msgspec.Meta(max_length=16)] = "float32"
    """The session's wire dtype (of ``inputs`` and ``outputs``)."""
    quant: Annotated[str, msgspec.Meta(max_length=16)] = "none"
    accused_dtype: Annotated[str, msgspec.Meta(max_length=16)] = ""
    """The dtype the accused computes in, as its server record announced (for the tolerance; empty: unknown)."""
    v: int = EVIDENCE_VERSION


class _Msg(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class GetEvidence(_Msg, frozen=True, tag="get_evidence"):
    sha256: Sha256


class EvidenceData(_Msg, frozen=True, tag="evidence"):
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_EVIDENCE_BYTES)]


class EvidenceError(_Msg, frozen=True, tag="evidence_error"):
    message: Annotated[str, msgspec.Meta(max_length=1024)]


EvidenceMessage = GetEvidence | EvidenceData | EvidenceError

_blob_encoder = msgspec.msgpack.Encoder()
_blob_decoder = msgspec.msgpack.Decoder(EvidenceBlob)
_msg_decoder = msgspec.msgpack.Decoder(EvidenceMessage)


def encode_blob(blob: EvidenceBlob) -> bytes:
    data = _blob_encoder.encode(blob)
    if len(data) > MAX_EVIDENCE_BYTES:
        raise LimitExceededError(f"evidence blob of {len(data)} bytes (limit MAX_EVIDENCE_BYTES {MAX_EVIDENCE_BYTES})")
    return data


def decode_blob(data: bytes) -> EvidenceBlob:
    if len(data) > MAX_EVIDENCE_BYTES:
        raise LimitExceededError(f"evidence blob of {len(data)} bytes (limit MAX_EVIDENCE_BYTES {MAX_EVIDENCE_BYTES})")
    try:
        blob = _blob_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise WireError(f"malformed evidence blob: {err}") from None
    if blob.v != EVIDENCE_VERSION:
        raise WireError(f"evidence blob version {blob.v}, this peer reads version {EVIDENCE_VERSION}")
    return blob


def encode_evidence_message(msg: EvidenceMessage) -> bytes:
    return _blob_encoder.encode(msg)


def decode_evidence_message(data: bytes | memoryview) -> EvidenceMessage:
    try:
        return _msg_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise WireError(f"malformed evidence message: {err}") from None
