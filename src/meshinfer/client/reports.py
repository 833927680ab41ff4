"""Reports against lying servers: building one, and verifying one before believing it (issue 19, D5).

Contract: ``make_report(blob, reporter=..., addresses=...)`` gives the ``ReportRecord`` (``wire.records``) for an
evidence blob (``client.evidence.evidence_for``) and the blob's bytes. ``check_evidence(record, data)`` is every
check that needs no model: the bytes hash to ``record.blob_sha256`` and have its size; the blob names the same
accused, model, span, session and signed commit as the record; the accused's key hashes to its peer id; the chain
entries hash from ``p2p.commit.genesis`` to the signed head, under a valid signature of the accused
(``p2p.commit.verify_chain``); the replayed steps are chain entries in chain order whose positions run from 0
without gaps to past the window, and every entry left out before the last replayed one is superseded by a later
replayed entry over the same positions (an honest retry); each input and claimed output hashes to its entry. It
returns the decoded blob or raises ``ReportRejected`` naming the first failed check. ``verify_report(record, data,
recompute)`` then recomputes the replayed steps (``recompute``: a ``Recompute``, e.g. ``local_recompute(span)`` over
this peer's own weights, or ``remote_recompute`` through a server of the span that is neither accused nor
reporter) and compares the claimed outputs of the window with D2's statistics: a report is VERIFIED only when the
comparison fails (the accused's signed outputs are wrong); when the claim matches the recomputation the report
is REJECTED (false). So a forged report (altered inputs or claimed outputs: hashes; another peer's commit or key:
signature; a report under another peer's subkey: the DHT validator, ``p2p.signing``) is never believed.

Comparison: ``client.audit_math`` (``tolerance_for`` of the accused's and the recomputing servers' dtypes and the
route's quant mode, and ``judge``), the same calibrated rule the audits use.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from meshinfer.client.audit_math import Tolerance, judge, tolerance_for
from meshinfer.errors import MeshinferError, WireError
from meshinfer.models.span import BlockSpan
from meshinfer.p2p.commit import SignedCommit, sha256, verify_chain
from meshinfer.wire.evidence import EvidenceBlob, decode_blob, encode_blob
from meshinfer.wire.records import ReportRecord
from meshinfer.wire.tensor import decode_tensor, encode_tensor

Recompute = Callable[[list[torch.Tensor]], Awaitable[list[torch.Tensor]]]
"""``recompute(inputs)``: the span's outputs for the steps ``inputs`` ([T_k, H] each, positions from 0, in order)
on a fresh session."""


class ReportRejected(MeshinferError):
    """A report that is not believed; the message names the failed check."""


def window_fails(claimed: torch.Tensor, recomputed: torch.Tensor, tol: Tolerance) -> bool:  # [P, H] each
    """D2 (``client.audit_math.judge``): a position's relative error above ``tol.rel_err``, or the window's signed
    mean projection ratio off 1 by more than ``tol.scale``."""
    return not judge(claimed, recomputed, tol).ok


def make_report(blob: EvidenceBlob, *, reporter: str, addresses: Sequence[str] = (),
                direct_addresses: Sequence[str] = (), verifier_dtype: str = "") -> tuple[ReportRecord, bytes]:
    """The record announcing ``blob`` and the blob's bytes (to store and serve)."""
    data = encode_blob(blob)
    record = ReportRecord(
        reporter=reporter, accused=blob.accused, model_id=blob.model_id, span=blob.span, session_id=blob.session_id,
        quant=blob.quant, dtype=blob.dtype, commit_steps=blob.commit_steps, commit_head=blob.commit_head,
        commit_signature=blob.commit_signature, accused_key=blob.public_key, window_start=blob.window_start,
        window_end=blob.window_end, blob_sha256=hashlib.sha256(data).digest(), blob_size=len(data),
        addresses=list(addresses)[:16], direct_addresses=list(direct_addresses)[:8], verifier_dtype=verifier_dtype,
        accused_dtype=blob.accused_dtype, created=time.time())
    return record, data


def check_evidence(record: ReportRecord, data: bytes) -> EvidenceBlob:
    """Every model-free check of a report and its blob (see the module docstring); ``ReportRejected`` if one fails."""
    if len(data) != record.blob_size or hashlib.sha256(data).digest() != record.blob_sha256:
        raise ReportRejected("the evidence blob does not hash to the report's blob_sha256")
    try:
        blob = decode_blob(data)
    except WireError as err:
        raise ReportRejected(f"the evidence blob is malformed: {err}") from None
    same = (blob.accused == record.accused and blob.model_id == record.model_id and blob.span == record.span
            and blob.session_id == record.session_id and blob.commit_steps == record.commit_steps
            and blob.commit_head == record.commit_head and blob.commit_signature == record.commit_signature
            and blob.public_key == record.accused_key and blob.window_start == record.window_start
            and blob.window_end == record.window_end and blob.dtype == record.dtype
            and blob.accused_dtype == record.accused_dtype)
    if not same:
        raise ReportRejected("the evidence blob describes another session, commit or window than the report")
    why = verify_chain(blob.model_id, blob.span, blob.session_id, blob.accused, blob.entries,
                       SignedCommit(blob.commit_steps, blob.commit_head, blob.commit_signature, blob.public_key))
    if why is not None:
        raise ReportRejected(why)
    _check_steps(blob)
    return blob


def _check_steps(blob: EvidenceBlob) -> None:
    entries, steps = blob.entries, blob.steps
    if not steps or len(blob.inputs) != len(steps) or not 0 < len(blob.outputs) <= len(steps):
        raise ReportRejected("the evidence lists no steps, or inputs/outputs that do not match its steps")
    if any(b <= a for a, b in itertools.pairwise(steps)) or steps[-1] >= len(entries):
        raise ReportRejected("the replayed steps are not chain entries in chain order")
    position = 0
    for k in steps:
        if entries[k].position != position:
            raise ReportRejected(f"the replayed steps skip from position {position} to {entries[k].position}")
        position += entries[k].tokens
    if not blob.window_start < blob.window_end <= position:
        raise ReportRejected(f"the window [{blob.window_start}, {blob.window_end}) is not inside the replayed "
                             f"positions [0, {position})")
    chosen = set(steps)
    for j in range(steps[-1]):
        if j in chosen:
            continue
        e = entries[j]
        if not any(c > j and entries[c].position <= e.position
                   and e.position + e.tokens <= entries[c].position + entries[c].tokens for c in steps):
            raise ReportRejected(f"chain entry {j} (position {e.position}) is left out but not superseded")
    first_out = len(steps) - len(blob.outputs)
    last_start = entries[steps[first_out]].position
    if (first_out > 0 and entries[steps[first_out - 1]].position + entries[steps[first_out - 1]].tokens > \
            blob.window_start) or last_start > blob.window_start:
        raise ReportRejected("the claimed outputs are not those of the steps overlapping the window")
    for n, k in enumerate(steps):
        e = entries[k]
        t = blob.inputs[n]
        if t.dtype != blob.dtype or len(t.shape) != 2 or t.shape[0] != e.tokens or sha256(t.data) != e.input_sha:
            raise ReportRejected(f"the input of step {e.step_id} is not the one the accused signed")
        if n >= first_out:
            o = blob.outputs[n - first_out]
            if o.dtype != t.dtype or o.shape != t.shape or sha256(o.data) != e.output_sha:
                raise ReportRejected(f"the claimed output of step {e.step_id} is not the one the accused signed")


@dataclass(frozen=True)
class Verdict:
    verified: bool
    """True: the accused's signed outputs are wrong (believe the report); False: the report is false."""
    reason: str


async def verify_report(record: ReportRecord, data: bytes, recompute: Recompute,
                        verifier_dtype: str | None = None) -> Verdict:
    """Check the report and its blob, recompute, compare (see the module docstring). ``ReportRejected`` for a
    report whose evidence fails a check; a ``Verdict`` otherwise. The tolerance is that of the accused's compute
    dtype (``record.accused_dtype``, else the wire dtype) against ``verifier_dtype`` (the recomputing servers'
    least precise compute dtype; None: the wire dtype)."""
    blob = check_evidence(record, data)
    inputs = [decode_tensor(t) for t in blob.inputs]
    outputs = await recompute(inputs)
    if len(outputs) != len(inputs):
        raise ReportRejected("the recomputation did not return one output per step")
    first_out = len(inputs) - len(blob.outputs)
    start = blob.entries[blob.steps[first_out]].position
    claimed = torch.cat([decode_tensor(t) for t in blob.outputs], dim=0)  # [P', H]
    mine = torch.cat(outputs[first_out:], dim=0).to(claimed.dtype)  # [P', H]
    a, b = blob.window_start - start, blob.window_end - start
    tol = tolerance_for(record.accused_dtype or blob.dtype, verifier_dtype or blob.dtype, blob.quant,
                        int(claimed.shape[-1]))  # the width sets the 16-bit scale floor, as in audits
    if window_fails(claimed[a:b], mine[a:b], tol):
        return Verdict(True, f"the accused's outputs for positions [{blob.window_start}, {blob.window_end}) differ "
                             "from the recomputation beyond tolerance")
    return Verdict(False, "the accused's outputs match the recomputation: the report is false")


def local_recompute(span: BlockSpan) -> Recompute:
    """A ``Recompute`` over ``span`` in this process (this peer's own weights of the report's blocks)."""
    async def recompute(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        total = sum(x.shape[0] for x in inputs)
        cache = span.new_cache(max(1, total))
        outs = []
        for x in inputs:  # [T, H]
            y = span(x.to(span.dtype).unsqueeze(0), cache)[0]  # [T, H]
            outs.append(encode_and_decode(y.to(x.dtype)))
        return outs

    return recompute


def encode_and_decode(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a server would have sent it (its wire dtype), on the CPU."""
    return decode_tensor(encode_tensor(x))
