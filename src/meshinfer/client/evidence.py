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
should only judge windows ``evidence_for`` can cover: ``committed_upto(hs)`` is where that coverage ends for a hop
(and whether waiting can extend it); ``evidence_of(hs, session, a, b)`` is ``evidence_for`` of a ``HopSession``
that may no longer be one of the session's hops (replaced by a failover). A step cut by a rollback
(``InferenceSession.rewind``: its recorded token count is smaller than the one the hop signed) cannot be evidence:
the client no longer holds the inputs the hop signed for it. ``push_mismatches(log_i, log_i+1)`` names the steps where
two consecutive hops signed different bytes for what went between them. Reads the session, changes nothing; no
network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from meshinfer.p2p.commit import CommitLog, sha256
from meshinfer.wire.evidence import EvidenceBlob
from meshinfer.wire.tensor import Tensor, encode_tensor

if TYPE_CHECKING:  # the session imports the audits, which import this module
    from meshinfer.client.hops import HopSession
    from meshinfer.client.session import InferenceSession


@dataclass(frozen=True)
class EvidenceUnavailable:
    """Why ``evidence_for`` has no evidence (yet)."""

    reason: str


def evidence_for(session: InferenceSession, i: int, a: int, b: int) -> EvidenceBlob | EvidenceUnavailable:
    """The evidence blob of hop ``i`` for the positions [a, b) (see the module docstring)."""
    if not 0 <= a < b <= session.position:
        return EvidenceUnavailable(f"window [{a}, {b}) is not inside the {session.position} positions computed")
    return evidence_of(session.hops[i], session, a, b)


def evidence_of(hs: HopSession, session: InferenceSession, a: int, b: int) -> EvidenceBlob | EvidenceUnavailable:
    """``evidence_for`` of ``hs``, a hop of ``session`` now or earlier (replaced by a failover: its own history)."""
    if hs.commits is None:
        return EvidenceUnavailable("no signed commit from this hop yet")
    if not hs.inputs or not hs.outputs:
        return EvidenceUnavailable("this hop has computed nothing")
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
    for step_id, position, tokens in used:
        index = log.index(step_id)
        if index is None or index >= log.signed.steps:
            return EvidenceUnavailable(f"step {step_id} is not covered by a signed commit yet")
        if log.entries[index].tokens != tokens or log.entries[index].position != position:
            return EvidenceUnavailable(f"step {step_id} was cut by a rollback (the hop signed "
                                       f"{log.entries[index].tokens} tokens, the client kept {tokens})")
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


def committed_upto(hs: HopSession) -> tuple[int, str | None]:
    """(n, stuck): positions [0, n) of ``hs`` are steps covered by its latest signed commit, as evidence can show
    them; ``stuck`` says why n cannot grow by waiting for the next commit (no commit log, commits refused, a step
    of unknown id or cut by a rollback), None when it can."""
    log = hs.commits
    if log is None:
        return 0, "the hop keeps no commit log"
    if log.broken is not None:
        return 0, f"the hop's commits were refused: {log.broken}"
    upto = 0
    for step_id, position, tokens in hs.steps:
        index = log.index(step_id)
        if step_id < 0:
            return upto, "a step of unknown id"
        if index is None or log.signed is None or index >= log.signed.steps:
            return upto, None
        entry = log.entries[index]
        if entry.tokens != tokens or entry.position != position:
            return upto, f"step {step_id} was cut by a rollback"
        upto = position + tokens
    return upto, None


def push_mismatches(before: CommitLog, after: CommitLog) -> list[int]:
    """Step ids for which ``after`` (hop i+1) signed another input than the output ``before`` (hop i) signed for the
    same step: one of the two lied about what went from one to the other (a pushed step carries the very bytes the
    previous hop returned, and a step the client drives itself re-encodes them bit for bit). Only steps committed
    by both are compared; which of the two lied takes a recomputation (the audit's third opinion)."""
    outputs = {e.step_id: e.output_sha for e in before.entries}
    return [e.step_id for e in after.entries if e.step_id in outputs and outputs[e.step_id] != e.input_sha]
