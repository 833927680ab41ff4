"""Reports (client.reports, client.evidence): a true report is verified, a false or forged one is rejected.

A "server" here is a real ``BlockSpan`` of the tiny llama computing each step, with a real commitment chain signed by
a real key; the client's ``CommitLog`` records its results as they would arrive. Recomputation is local (the
verifier's own weights of the span)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import torch

from meshinfer.client.evidence import EvidenceUnavailable, build_evidence
from meshinfer.client.reports import (
    ReportRejected,
    check_evidence,
    local_recompute,
    make_report,
    verify_report,
)
from meshinfer.errors import LimitExceededError, WireError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.p2p.commit import CommitChain, CommitLog, sign_commit
from meshinfer.p2p.identity import Identity
from meshinfer.types import BlockRange
from meshinfer.wire.evidence import EvidenceBlob, decode_blob, encode_blob
from meshinfer.wire.limits import MAX_RECORD_BYTES
from meshinfer.wire.messages import StepResult
from meshinfer.wire.records import ReportRecord, decode_record, encode_record
from meshinfer.wire.tensor import Tensor, encode_tensor

SPAN = BlockRange(0, 2)


@pytest.fixture(scope="module")
def span(meshinfer_cache_dir: Path) -> BlockSpan:
    from meshinfer.testing.checkpoints import tiny_checkpoint

    return Checkpoint(tiny_checkpoint("llama")).load_span(SPAN)


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


@dataclass
class Served:
    log: CommitLog
    steps: list[tuple[int, int, int]]
    inputs: torch.Tensor  # [P, H]
    outputs: torch.Tensor  # [P, H]
    model_id: str


def _serve(span: BlockSpan, ident: Identity, *, lie_from: int | None = None, scale: float = 1.05,
           tokens: tuple[int, ...] = (5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)) -> Served:
    """Run ``tokens`` steps through ``span`` as a server would (a commit every 4 results); from position
    ``lie_from`` on, its outputs are multiplied by ``scale`` (and signed as such)."""
    model_id = "0123456789abcdef0123456789abcdef"
    torch.manual_seed(0)
    chain = CommitChain(model_id, SPAN, "sess", ident.peer_id, every=4)
    log = CommitLog(model_id, SPAN, "sess", ident.peer_id)
    cache = span.new_cache(64)
    steps, ins, outs, position = [], [], [], 0
    for k, t in enumerate(tokens):
        x = torch.randn(t, span.spec.hidden_size)  # [T, H]
        y = span(x.to(span.dtype).unsqueeze(0), cache)[0].float()  # [T, H] in the session's float32
        if lie_from is not None and position + t > lie_from:
            y = y * scale
        wx, wy = encode_tensor(x), encode_tensor(y)
        chain.extend(k, position, t, wx.data, wy.data)
        commit = sign_commit(ident, "sess", chain.seal()) if chain.due else None
        log.record(StepResult(session_id="sess", step_id=k, hidden=wy, commit=commit))
        steps.append((k, position, t))
        ins.append(x)
        outs.append(y)
        position += t
    return Served(log, steps, torch.cat(ins), torch.cat(outs), model_id)


def _report(served: Served, a: int, b: int, accused_dtype: str = "") -> tuple[ReportRecord, bytes]:
    blob = build_evidence(served.log, served.steps, served.inputs, served.outputs, a, b, dtype="float32",
                          accused_dtype=accused_dtype)
    assert isinstance(blob, EvidenceBlob), blob
    return make_report(blob, reporter="QmReporter", addresses=["/ip4/127.0.0.1/tcp/1"])


def _verify(span: BlockSpan, record: ReportRecord, data: bytes):
    return asyncio.run(verify_report(record, data, local_recompute(span)))


def test_a_true_report_is_verified(span: BlockSpan, ident: Identity) -> None:
    record, data = _report(_serve(span, ident, lie_from=10), 10, 13)
    verdict = _verify(span, record, data)
    assert verdict.verified, verdict.reason


def test_a_report_against_an_honest_server_is_rejected(span: BlockSpan, ident: Identity) -> None:
    record, data = _report(_serve(span, ident), 10, 13)
    verdict = _verify(span, record, data)
    assert not verdict.verified


def test_a_one_percent_scale_is_caught_by_the_mean_projection(span: BlockSpan, ident: Identity) -> None:
    record, data = _report(_serve(span, ident, lie_from=8, scale=1.01), 8, 16)
    assert _verify(span, record, data).verified


def test_evidence_needs_a_signed_commit(span: BlockSpan, ident: Identity) -> None:
    served = _serve(span, ident)  # 16 steps, commits at 4, 8, 12, 16: positions [0, 20)
    assert isinstance(build_evidence(served.log, served.steps, served.inputs, served.outputs, 0, 21,
                                     dtype="float32"), EvidenceUnavailable)
    short = _serve(span, ident, tokens=(5, 1, 1))  # no commit yet
    assert isinstance(build_evidence(short.log, short.steps, short.inputs, short.outputs, 5, 6, dtype="float32"),
                      EvidenceUnavailable)


def _tampered(record: ReportRecord, blob: EvidenceBlob) -> tuple[ReportRecord, bytes]:
    """The blob changed by a forger, with a record that points at the new blob (a consistent forgery)."""
    data = encode_blob(blob)
    return msgspec.structs.replace(record, blob_sha256=hashlib.sha256(data).digest(), blob_size=len(data)), data


def _flip(t: Tensor) -> Tensor:
    return Tensor(t.dtype, t.shape, bytes([t.data[0] ^ 1]) + t.data[1:])


def test_forged_inputs_are_rejected(span: BlockSpan, ident: Identity) -> None:
    record, data = _report(_serve(span, ident), 10, 13)
    blob = decode_blob(data)
    forged = msgspec.structs.replace(blob, inputs=[_flip(blob.inputs[0]), *blob.inputs[1:]])
    with pytest.raises(ReportRejected, match="input"):
        check_evidence(*_tampered(record, forged))


def test_a_tampered_claim_is_rejected(span: BlockSpan, ident: Identity) -> None:
    record, data = _report(_serve(span, ident), 10, 13)
    blob = decode_blob(data)
    forged = msgspec.structs.replace(blob, outputs=[_flip(blob.outputs[0]), *blob.outputs[1:]])
    with pytest.raises(ReportRejected, match="claimed output"):
        check_evidence(*_tampered(record, forged))


def test_a_blob_that_is_not_the_announced_one_is_rejected(span: BlockSpan, ident: Identity) -> None:
    record, data = _report(_serve(span, ident), 10, 13)
    with pytest.raises(ReportRejected, match="blob_sha256"):
        check_evidence(record, data[:-1] + bytes([data[-1] ^ 1]))


def test_a_commit_signed_by_another_key_is_rejected(span: BlockSpan, ident: Identity) -> None:
    """A forger signs a chain of wrong outputs with its own key but names the honest server as accused."""
    forger = Identity.generate()
    record, data = _report(_serve(span, forger, lie_from=10), 10, 13)
    blob = decode_blob(data)
    framed = msgspec.structs.replace(blob, accused=ident.peer_id)
    framed_record = msgspec.structs.replace(record, accused=ident.peer_id)
    with pytest.raises(ReportRejected, match=r"signed head|signature"):
        check_evidence(*_tampered(framed_record, framed))
    framed = msgspec.structs.replace(framed, public_key=ident.public_key)  # the victim's real key: no signature
    framed_record = msgspec.structs.replace(framed_record, accused_key=ident.public_key)
    with pytest.raises(ReportRejected, match=r"signed head|signature"):
        check_evidence(*_tampered(framed_record, framed))


def test_dropping_a_step_from_the_replay_is_rejected(span: BlockSpan, ident: Identity) -> None:
    record, data = _report(_serve(span, ident), 10, 13)
    blob = decode_blob(data)
    forged = msgspec.structs.replace(blob, steps=blob.steps[1:], inputs=blob.inputs[1:])
    with pytest.raises(ReportRejected, match="position"):
        check_evidence(*_tampered(record, forged))


def test_report_records_are_bounded_and_checked() -> None:
    base = ReportRecord(reporter="Qr", accused="Qa", model_id="0" * 32, span=SPAN, session_id="s", quant="none",
                        dtype="float32", commit_steps=4, commit_head=b"h" * 32, commit_signature=b"s",
                        accused_key=b"k", window_start=0, window_end=4, blob_sha256=b"b" * 32, blob_size=10)
    assert decode_record(encode_record(base)) == base
    for bad in (msgspec.structs.replace(base, accused="Qr"), msgspec.structs.replace(base, window_end=0)):
        with pytest.raises(Exception, match="report"):
            decode_record(encode_record(bad))
    biggest = msgspec.structs.replace(base, addresses=["/ip4/" + "1" * 506] * 16, accused_key=b"k" * 1024,
                                      direct_addresses=["/ip4/" + "1" * 506] * 8, commit_signature=b"s" * 1024,
                                      reporter="Q" * 256, accused="A" * 256, session_id="s" * 256)
    assert len(encode_record(biggest)) <= MAX_RECORD_BYTES  # every field is bounded: a report always fits
    too_long = msgspec.msgpack.encode(msgspec.structs.replace(biggest, accused_key=b"k" * 1025))
    with pytest.raises(WireError):
        decode_record(too_long)
    with pytest.raises(LimitExceededError):
        decode_record(b"\x00" * (MAX_RECORD_BYTES + 1))


def test_an_honest_bfloat16_server_is_judged_with_its_dtypes_tolerance(span: BlockSpan, ident: Identity,
                                                                      meshinfer_cache_dir: Path) -> None:
    """Its outputs differ from a float32 recomputation by bf16 rounding: fine for its dtype, not for float32's."""
    from meshinfer.testing.checkpoints import tiny_checkpoint

    half = Checkpoint(tiny_checkpoint("llama")).load_span(SPAN, dtype="bfloat16")
    served = _serve(half, ident)
    assert not _verify(span, *_report(served, 8, 20, accused_dtype="bfloat16")).verified
    assert _verify(span, *_report(served, 8, 20)).verified  # unknown dtype: float32's tolerance frames it
