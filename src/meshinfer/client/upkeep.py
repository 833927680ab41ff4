"""``Upkeep``: a ``DistributedModel``'s periodic background chores: checking reports, publishing its audit tally.

Contract (issue 19): one ``Upkeep`` per ``DistributedModel``, a task on the client's event loop started with the
model (``start``) and stopped on close (``aclose``); it never raises. Every ``report_check_s`` seconds (the first
round ``first_run_s`` after the start, 10 s by default) it

- calls ``SwarmView.check_reports(ref)``: new reports of the model are verified (a verified one makes this
  client's routes avoid the accused; the view logs it); one log line per report found false or rejected;
- publishes this client's AUDIT TALLY (``tally_record``: per audited server, the most audited first, at most
  ``wire.records.MAX_TALLY_PEERS``, the windows passed and failed and the positions verified, plus totals) under
  ``audits:<model_id>`` with this client's peer id as the subkey, for ``TALLY_TTL_S``: when the counters changed
  since the last tally stored, and again every half TTL while the client runs. No tally while nothing was audited.

``report_check_s`` 0 turns the report checks off (the tally is then published every ``DEFAULT_PERIOD_S``);
``publish_audits`` False turns the tally off; both off: no task. A failed round (unreachable DHT, a report that
cannot be checked now) is logged at debug level and tried again next round. Knows the swarm only through
``SwarmView`` and its node; nothing here touches tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

from meshinfer.client.audit import AuditCounters
from meshinfer.client.swarm import ModelRef, SwarmView
from meshinfer.wire.records import MAX_TALLY_PEERS, AuditTallyRecord, PeerTally, audits_key

log = logging.getLogger(__name__)

TALLY_TTL_S: Final = 600.0
"""How long a published audit tally lives in the DHT (re-published every half of it while the client runs)."""
FIRST_RUN_S: Final = 10.0
"""Seconds after the start before the first round (at most one period)."""
DEFAULT_PERIOD_S: Final = 60.0
"""Seconds between two tallies when report checks are off."""

TallyState = tuple[tuple[tuple[str, int, int, int], ...], int, int]


def tally_record(counters: AuditCounters, *, client: str, model_id: str, now: float) -> AuditTallyRecord | None:
    """This client's tally of ``counters`` (None while no server had an audit window checked)."""
    audited = [(peer, a) for peer, a in counters.peers.items() if a.passed or a.failed]
    if not audited:
        return None
    audited.sort(key=lambda item: (-(item[1].passed + item[1].failed), item[0]))
    peers = [PeerTally(peer, a.passed, a.failed, a.positions) for peer, a in audited[:MAX_TALLY_PEERS]]
    return AuditTallyRecord(client=client, model_id=model_id, peers=peers,
                            passed=sum(a.passed for _, a in audited), failed=sum(a.failed for _, a in audited),
                            detections=counters.detections, unresolved=counters.unresolved, created=now)


def tally_state(counters: AuditCounters) -> TallyState:
    """What a tally says, to tell whether it changed."""
    peers = tuple(sorted((p, a.passed, a.failed, a.positions) for p, a in counters.peers.items()))
    return peers, counters.detections, counters.unresolved


def tally_due(state: TallyState, published: TallyState | None, published_at: float, now: float,
              ttl_s: float) -> bool:
    """Whether to publish the tally now: the counters changed since the last one stored, or half its TTL passed."""
    return state != published or now - published_at >= ttl_s / 2


class Upkeep:
    """The periodic chores of one ``DistributedModel`` (see the module docstring)."""

    def __init__(self, view: SwarmView, ref: ModelRef, counters: AuditCounters, *, report_check_s: float,
                 publish_audits: bool, first_run_s: float = FIRST_RUN_S, tally_ttl_s: float = TALLY_TTL_S) -> None:
        self.view = view
        self.ref = ref
        self.counters = counters
        self.check_reports = report_check_s > 0
        self.publish_audits = publish_audits
        self.period = report_check_s if report_check_s > 0 else DEFAULT_PERIOD_S
        self.first_run_s = min(first_run_s, self.period)
        self.tally_ttl_s = tally_ttl_s
        self.rounds = 0
        """Rounds run so far."""
        self.tallies_published = 0
        self._published: TallyState | None = None
        self._published_at = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.check_reports or self.publish_audits

    def start(self) -> None:
        """Start the background task on the running loop (no-op when disabled or already started)."""
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"upkeep:{self.ref.model_id[:12]}")

    async def _run(self) -> None:
        await asyncio.sleep(self.first_run_s)
        while True:
            await self.run_once()
            await asyncio.sleep(self.period)

    async def run_once(self) -> None:
        """One round: check reports, publish the tally if due. Never raises (but lets cancellation through)."""
        self.rounds += 1
        if self.check_reports:
            try:
                for record, outcome in await self.view.check_reports(self.ref):
                    if outcome != "verified" and not outcome.startswith("unchecked"):
                        log.info("report against %s by %s: %s", record.accused[:12], record.reporter[:12],
                                 outcome)
            except Exception as err:
                log.debug("checking the reports of %s failed: %s", self.ref.describe(), err)
        if self.publish_audits:
            try:
                await self.publish_tally()
            except Exception as err:
                log.debug("publishing the audit tally of %s failed: %s", self.ref.describe(), err)

    async def publish_tally(self, *, force: bool = False) -> bool:
        """Publish the tally when the counters changed since the last one stored, or half its TTL passed (or
        ``force``); whether one was stored now."""
        state = tally_state(self.counters)
        now = time.time()
        if not force and not tally_due(state, self._published, self._published_at, now, self.tally_ttl_s):
            return False
        record = tally_record(self.counters, client=self.view.peer_id, model_id=self.ref.model_id, now=now)
        if record is None:
            return False
        ok = await self.view.node.dht_put_record(audits_key(self.ref.model_id), record, now + self.tally_ttl_s)
        if ok:
            self._published, self._published_at = state, now
            self.tallies_published += 1
        else:
            log.debug("the audit tally of %s was not stored in the DHT", self.ref.describe())
        return ok

    async def aclose(self) -> None:
        """Stop the task (idempotent; never raises)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
