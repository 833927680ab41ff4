"""From a lie an audit caught to a published report (issue 19, D4/D5): the evidence, built at once, sent off later.

Contract: a ``Reporter`` belongs to one ``client.audit.Auditor``. ``publish(hop, bad, end, verifier_dtype)`` is
called when a referee confirmed that ``hop`` (a ``HopSession`` of the session, or one replaced since) lied from
position ``bad`` in a window ending at ``end``. It builds the evidence synchronously, before the generation's
rollback cuts the hop's history: ``client.evidence.evidence_of`` over the hop's own steps, inputs, claimed outputs
and signed commits, for the smallest window that shows the lie, [bad, min(end, where the hop's signed commit
ends)). No evidence (the lie lies beyond the commit, the commits are broken, a step was cut by an earlier
rollback...) counts ``AuditCounters.unreportable`` and logs why. Evidence goes to ``report`` (the client's
``SwarmView.report``: a signed DHT record other peers re-verify before they believe it; None: nothing is
published) in a background task on the running loop: the generation never waits for it, an error is logged, a
success counts ``AuditCounters.reports``. The tasks are kept until done, not cancelled when the session closes
(a report outlives the session that found the lie). Knows nothing of shadows, referees or rollbacks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

from meshinfer.client.evidence import EvidenceUnavailable, committed_upto, evidence_of
from meshinfer.wire.evidence import EvidenceBlob

if TYPE_CHECKING:
    from meshinfer.client.audit import AuditCounters
    from meshinfer.client.hops import HopSession
    from meshinfer.client.session import InferenceSession

log = logging.getLogger(__name__)


class ReportCallback(Protocol):
    """``report(blob, verifier_dtype=...)``: publish evidence of a lie (the client's ``SwarmView.report``); the dtype
    is the referee's, whose recomputation disagreed with the claims."""

    def __call__(self, blob: EvidenceBlob, *, verifier_dtype: str = ...) -> Awaitable[object]: ...


class Reporter:
    """The reports of one audited session (see the module docstring)."""

    def __init__(self, session: InferenceSession, counters: AuditCounters, report: ReportCallback | None) -> None:
        self.session = session
        self.counters = counters
        self.report = report
        self._tasks: set[asyncio.Task[None]] = set()

    def evidence(self, hop: HopSession, bad: int, end: int) -> EvidenceBlob | EvidenceUnavailable:
        """The evidence that ``hop`` lied from ``bad`` on, in [bad, end) cut to its signed commit."""
        committed, _ = committed_upto(hop)
        if committed <= bad:
            return EvidenceUnavailable(f"position {bad} is not covered by its signed commit (up to {committed})")
        return evidence_of(hop, self.session, bad, min(end, committed))

    def publish(self, hop: HopSession, bad: int, end: int, verifier_dtype: str) -> None:
        """Build the evidence now and publish it in the background (never raises, never waits)."""
        blob = self.evidence(hop, bad, end)
        if isinstance(blob, EvidenceUnavailable):
            self.counters.unreportable += 1
            log.warning("the lie of %s at position %d cannot be reported: %s", hop.where(), bad, blob.reason)
            return
        if self.report is None:
            return
        report = self.report

        async def send() -> None:
            try:
                await report(blob, verifier_dtype=verifier_dtype)
            except Exception as err:  # never the generation's problem
                log.warning("publishing the report against %s failed: %s", hop.where(), err)
                return
            self.counters.reports += 1
            log.warning("published a signed report: %s lied on positions [%d, %d)", hop.where(), blob.window_start,
                        blob.window_end)

        task = asyncio.get_running_loop().create_task(send(), name="audit-report")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        """Reports still being published."""
        return len(self._tasks)
