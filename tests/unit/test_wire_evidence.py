"""The evidence blob and the ``meshinfer/evidence/1`` messages (wire.evidence), and the store's bound."""

from __future__ import annotations

import hashlib

import pytest

from meshinfer.client.report_service import EvidenceStore
from meshinfer.errors import LimitExceededError, WireError
from meshinfer.wire.evidence import (
    MAX_EVIDENCE_BYTES,
    EvidenceData,
    EvidenceError,
    GetEvidence,
    decode_blob,
    decode_evidence_message,
    encode_evidence_message,
)


def test_messages_round_trip_and_malformed_input_is_a_wire_error() -> None:
    for msg in (GetEvidence(sha256=b"x" * 32), EvidenceData(data=b"abc"), EvidenceError(message="no")):
        assert decode_evidence_message(encode_evidence_message(msg)) == msg
    for bad in (b"", b"\xc1", encode_evidence_message(EvidenceError(message="x"))[:-1]):
        with pytest.raises(WireError):
            decode_evidence_message(bad)
    with pytest.raises(WireError):  # a hash must be 32 bytes
        decode_evidence_message(encode_evidence_message(GetEvidence(sha256=b"x" * 32)).replace(b"x" * 32, b"x" * 31))


def test_blobs_are_bounded_before_decoding() -> None:
    with pytest.raises(LimitExceededError):
        decode_blob(b"\x00" * (MAX_EVIDENCE_BYTES + 1))
    with pytest.raises(WireError):
        decode_blob(b"\x80")


def test_the_store_keeps_the_newest_blobs_within_its_bound() -> None:
    store = EvidenceStore(max_bytes=10)
    first = store.add(b"a" * 6)
    second = store.add(b"b" * 6)
    assert first == hashlib.sha256(b"a" * 6).digest()
    assert list(store.blobs) == [second]
