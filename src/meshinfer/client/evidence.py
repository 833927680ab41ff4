"""Evidence for one hop of a live session: what the audit code hands to a report (issue 19, D4/D5).

Contract: ``evidence_for(session, i, a, b)`` returns the ``wire.evidence.EvidenceBlob`` of hop ``i`` of an
``InferenceSession`` for the window of positions [a, b): the hop's verified chain entries up to its latest signed
commit, the steps the session took from that hop covering positions [0, b') (b' >= b: the end of the step that
holds position b-1), their inputs re-encoded from the session's history (bit-identical to the wire bytes: same
dtype, same bits) and the claimed outputs of the steps overlapping [a, b). It returns None, with the reason in
``EvidenceUnavailable``, when the evidence cannot bind the hop yet: a step is not covered by a signed commit (wait
for the next one: at most ``COMMIT_EVERY`` steps, or set ``InferenceSession.want_commit`` so the next step asks
every hop for one), the hop's commits were refused (``CommitLog.broken``), or an
input's hash differs from the one the hop signed (it says it computed something else than the client holds; for a
pushed hop the previous server may have pushed other bytes than it returned: ambiguous, so no report). Audits
should only judge windows ``evidence_for`` can cover. ``push_mismatches(log_i, log_i+1)`` names the steps where
two consecutive hops signed different bytes for what went between them. Reads the session, changes nothing; no
network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshinfer.client.session import InferenceSession
from meshinfer.p2p.commit import CommitLog, sha256
from meshinfer.wire.evidence import EvidenceBlob
from meshinfer.wire.tensor import Tensor, encode_tensor


@dataclass(frozen=True)
class EvidenceUnavailable:
    """Why ``evidence_for`` has no evidence (yet)."""

    reason: str


def evidence_for(session: InferenceSession, i: int, a: int, b: int) -> EvidenceBlob | EvidenceUnavailable:
    """The evidence blob of hop ``i`` for the positions [a, b) (see the module docstring)."""
    hs = session.hops[i]
    if not 0 <= a < b <= session.position:
        return EvidenceUnavailable(f"window [{a}, {b}) is not inside the {session.position} positions computed")
    if hs.commits is None:
        return EvidenceUnavailable("no signed commit from this hop yet")
    return build_evidence(hs.commits, hs.steps, torch.cat(hs.inputs, dim=0), torch.cat(hs.outputs, dim=0), a, b,
                          dtype=session.dtype, quant=session.quant or "none", accused_dtype=hs.hop.record.dtype)


def build_evidence(log: CommitLog, steps: Sequence[tuple[int, int, int]], inputs: torch.Tensor,
                   outputs: torch.Tensor, a: int, b: int, *, dtype: str, quant: str = "none",
                   accused_dtype: str = "") -> EvidenceBlob | EvidenceUnavailable:
    """``evidence_for`` from its parts: the hop's log, its (step id, position, tokens) steps in order, and its
    whole input and claimed output history ([P, H] each, in the session dtype)."""
    if log.signed is None:
        return EvidenceUnavailable("no signed commit from this hop yet")
    if log.broken is not None:
        return EvidenceUnavailable(f"the hop's commits were refused: {log.broken}")
    used = [s for s in steps if s[1] < b]
    if not 0 <= a < b or not used or used[-1][1] + used[-1][2] < b:
        return EvidenceUnavailable(f"window [{a}, {b}) is not inside the hop's computed positions")
    indices: list[int] = []
    for step_id, _, _ in used:
        index = log.index(step_id)
        if index is None or index >= log.signed.steps:
            return EvidenceUnavailable(f"step {step_id} is not covered by a signed commit yet")
        indices.append(index)
    wire_in: list[Tensor] = []
    wire_out: list[Tensor] = []
    for (_, position, tokens), index in zip(used, indices, strict=True):
        wire = encode_tensor(inputs[position:position + tokens])
        if sha256(wire.data) != log.entries[index].input_sha:
            return EvidenceUnavailable(f"the hop signed another input for position {position} than the client holds")
        wire_in.append(wire)
        if position + tokens > a:
            out = encode_tensor(outputs[position:position + tokens])
            if sha256(out.data) != log.entries[index].output_sha:
                return EvidenceUnavailable(f"the hop signed another output for position {position}")
            wire_out.append(out)
    signed = log.signed
    return EvidenceBlob(model_id=log.model_id, span=log.span, session_id=log.session_id, accused=log.peer_id,
                        public_key=signed.public_key, commit_steps=signed.steps, commit_head=signed.head,
                        commit_signature=signed.signature, entries=log.entries[:signed.steps], steps=indices,
                        inputs=wire_in, window_start=a, window_end=b, outputs=wire_out, dtype=dtype, quant=quant,
                        accused_dtype=accused_dtype)


def push_mismatches(before: CommitLog, after: CommitLog) -> list[int]:
    """Step ids for which ``after`` (hop i+1) signed another input than the output ``before`` (hop i) signed for the
    same step: one of the two lied about what went from one to the other (a pushed step carries the very bytes the
    previous hop returned, and a step the client drives itself re-encodes them bit for bit). Only steps committed
    by both are compared; which of the two lied takes a recomputation (the audit's third opinion)."""
    outputs = {e.step_id: e.output_sha for e in before.entries}
    return [e.step_id for e in after.entries if e.step_id in outputs and outputs[e.step_id] != e.input_sha]
