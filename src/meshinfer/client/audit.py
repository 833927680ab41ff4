"""Audits of a session's hops by shadow sessions (design D1, D3): detection, the liar named, where to roll back.

Contract: an ``Auditor`` belongs to one ``InferenceSession`` (``session.auditor``) and runs on its loop. After
every step (``after_step``) it decides, once per hop, whether the hop is shadowed (probability
``audit_fraction``); a shadowed hop gets a SHADOW: a session on an independent server whose span is exactly the
hop's (same quant mode, preferably the same announced dtype; planned by ``find``: a route over the span of one
hop, avoiding the audited peer and banned peers; none: the hop counts as unaudited). Each comparison uses
``audit_math.tolerance_for`` the two servers' announced dtypes and the route's quant mode. Whenever
``audit_every`` positions of a shadowed hop are unverified (and as soon as the shadow is open: the prompt's
positions, so the first token is released early), a background task (at most ``max_in_flight`` per session)
sends the hop's INPUTS since the shadow's last check as ONE ordinary ``Step`` to the shadow and compares its
outputs with the outputs the hop claimed (``client.audit_math.judge``). The generation never waits for an
audit, except in ``settle`` (the end of a generation: every position verified).

A failed window asks a REFEREE: a third server of the span (neither the audited peer nor the shadow's) replays
the hop's inputs [0, b) in chunks; ``audit_math.arbitrate`` names the side it disagrees with. That side is banned
(``PeerBans.ban``). The audited hop lying leaves a ``Detection`` (the hop and the first position of its claims
to distrust) for the generation loop to act on (``take_detection``: rewind the session to that position, fail
the hop over, resample from there); a lying shadow is dropped and the hop gets another. No referee, or a referee
that agrees with neither side: nobody is banned; the hop's audit is counted ``unresolved`` and it gets another
shadow.

A hop replaced by a failover keeps its shadow until the claims it made are verified (downstream hops and tokens
hold them); a lie found there rolls back the same way. ``verified_upto`` is the position up to which every
shadowed hop's claims were verified (tokens whose logits come from earlier positions are settled);
``rewind(position)`` forgets what lies beyond (a window in flight across a rewind is discarded). ``AuditCounters``
(``client.audit_tally``: per server peer passed/failed windows, unaudited hops) accumulate on the
``DistributedModel``; "no independent server" is logged at INFO once per (server peer, span) per client
(``AuditCounters.notices``), at DEBUG for the other sessions. Finding, opening and replaying on shadows and referees,
and cutting a hop's history, are ``client.audit_servers``'s (names re-exported here); the shadow record and where
a check's window ends, ``client.audit_window``'s.

Only committed positions are judged (design D4), so that every lie found can be shown to others: before each step
(``before_step``) the auditor asks the session for a signed commit (``InferenceSession.want_commit``) when a check
will be due after it, and a check's window ends where the hop's latest signed commit ends
(``client.evidence.committed_upto``). Judged anyway, beyond that: the tail of a generation in ``settle`` and the
claims of a hop replaced since (no more commits will come), and every claim of a hop whose commits are absent or
broken or that did not commit when asked (counted ``PeerAudits.uncommitted``: a server refusing to commit is
suspect). A lie found there is acted on the same (ban, rollback) but cannot be reported. A lie found in a committed
window becomes a REPORT: the evidence (``client.evidence.evidence_of`` the audited hop, window [first bad position,
end)) is built at once, before the rollback cuts the history, and handed to ``report`` (the client's
``SwarmView.report``: a signed DHT record others re-verify) in the background (``client.audit_reports``); the
generation never waits for it. ``AuditCounters.reports`` counts the published ones, ``unreportable`` the
detections without evidence (the reason is logged).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from meshinfer.client.audit_math import Tolerance, arbitrate, judge, tolerance_for
from meshinfer.client.audit_reports import ReportCallback, Reporter
from meshinfer.client.audit_servers import (
    DTYPE_TRIES,
    ServerFinder,
    cat_rows,
    open_one,
    replay,
    truncate_parts,
    truncate_steps,
)
from meshinfer.client.audit_tally import AuditCounters, PeerAudits, check_due
from meshinfer.client.audit_window import Shadow, window_end
from meshinfer.client.hops import HopSession
from meshinfer.errors import MeshinferError

if TYPE_CHECKING:
    from meshinfer.client.session import InferenceSession

log = logging.getLogger(__name__)

__all__ = [
    "DTYPE_TRIES", "AuditCounters", "Auditor", "Detection", "PeerAudits", "ServerFinder", "check_due",
    "truncate_parts", "truncate_steps",
]


@dataclass(frozen=True)
class Detection:
    """Hop ``hop`` (server ``peer_id``) lied; its claims from ``position`` on are not to be trusted."""

    hop: HopSession
    peer_id: str
    position: int


class Auditor:
    """The audits of one session's hops (see the module docstring)."""

    def __init__(self, session: InferenceSession, find: ServerFinder, counters: AuditCounters, *,
                 rng: random.Random | None = None, report: ReportCallback | None = None) -> None:
        self.session = session
        self.find = find
        self.counters = counters
        config = session.config
        self.every = config.audit_every
        self.fraction = config.audit_fraction
        self.max_in_flight = config.audit_in_flight
        self.rng = rng or random.Random()
        self.quant = session.quant or "none"
        self._shadows: dict[HopSession, Shadow] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._epoch = 0
        self.detection: Detection | None = None
        self.reporter = Reporter(session, counters, report)
        """Builds the evidence of a caught lie and publishes it (``report`` None: acted on, not published)."""
        self._asked: dict[HopSession, int] = {}
        """Per hop: the end position of the latest step that asked it for a signed commit."""

    # ---- scheduling ----------------------------------------------------------------------------

    def before_step(self, tokens: int) -> None:
        """A step of ``tokens`` is about to be sent: ask every hop for a signed commit on it when a check will be
        due after it (the window a check judges must be signed), or a hop is new (its first check comes at once).
        Once per window: while an ask beyond the hop's verified mark is outstanding (its check is waiting for a
        slot or running), the next check's window ends there and no step asks again (signing every step while a
        check runs cost ~2.6x the signatures)."""
        after = self.session.position + tokens
        for hs in self.session.hops:
            shadow = self._shadows.get(hs)
            if (shadow is None and self.fraction > 0) or (
                    shadow is not None and shadow.hs is not None and check_due(after, shadow.verified, self.every)
                    and self._asked.get(hs, 0) <= shadow.verified):
                self.session.want_commit = True
        if self.session.want_commit:
            for hs in self.session.hops:
                self._asked[hs] = after

    def _window_end(self, shadow: Shadow, upto: int, final: bool) -> int | None:
        """``client.audit_window.window_end`` of ``shadow`` with what this session asked of its hop."""
        return window_end(shadow, upto, final, self._asked.get(shadow.audited, 0), self.counters)

    def after_step(self) -> None:
        """Start the audits that are due (never waits)."""
        for hs in self.session.hops:
            shadow = self._shadows.get(hs)
            if shadow is None:
                if self.rng.random() >= self.fraction:
                    self._shadows[hs] = Shadow(hs)
                    self.counters.peer(hs.hop.peer_id).unaudited += 1
                    continue
                shadow = self._shadows[hs] = Shadow(hs, opening=True)
                self._spawn(self._open_shadow(shadow))
                continue
            if shadow.hs is not None and not shadow.busy and check_due(self.session.position, shadow.verified,
                                                                       self.every):
                end = self._window_end(shadow, self.session.position, final=False)
                if end is not None:
                    self._start_check(shadow, end)
        for shadow in self._shadows.values():  # hops replaced by a failover: their claims up to then
            target = self._target(shadow)
            if shadow.audited not in self.session.hops and shadow.hs is not None and shadow.verified < target \
                    and not shadow.busy:
                end = self._window_end(shadow, target, final=True)
                if end is not None:
                    self._start_check(shadow, end)

    def _target(self, shadow: Shadow) -> int:
        """The positions of ``shadow``'s hop to verify: all the session's, or for a hop replaced since (a
        failover), the claims it made (downstream hops and tokens still hold them)."""
        if shadow.audited in self.session.hops:
            return self.session.position
        return sum(out.shape[0] for out in shadow.audited.outputs)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # the coroutine itself is the task (not a wrapper awaiting it): cancelled before its first step, a task
        # throws CancelledError into it, where a wrapper would leave it never awaited (a RuntimeWarning)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_check(self, shadow: Shadow, upto: int) -> asyncio.Task[None] | None:
        if shadow.busy or len(self._tasks) >= self.max_in_flight or upto <= shadow.verified:
            return None
        shadow.busy = True
        shadow.checking = upto
        return self._spawn(self._check(shadow, upto))

    @property
    def verified_upto(self) -> int:
        """Every shadowed hop's claims are verified on positions [0, verified_upto)."""
        marks = [s.verified for s in self._shadows.values()
                 if (s.hs is not None or s.opening) and s.verified < self._target(s)]
        return min(marks, default=self.session.position)

    def audited(self, hs: HopSession) -> bool:
        shadow = self._shadows.get(hs)
        return shadow is not None and shadow.hs is not None

    async def settle(self) -> None:
        """Verify every position of every shadowed hop (the end of a generation)."""
        deadline = time.monotonic() + self.session.step_timeout
        while time.monotonic() < deadline:  # a lying verifier is replaced and its hop checked again
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            if self.detection is not None:
                return
            pending = [s for s in self._shadows.values() if s.hs is not None and s.verified < self._target(s)]
            opening = [s for s in self._shadows.values() if s.opening]
            if not pending and not opening:
                return
            for shadow in pending:
                if not shadow.busy:
                    shadow.busy = True
                    shadow.checking = (self._window_end(shadow, self._target(shadow), final=True)
                                       or self._target(shadow))
                    self._spawn(self._check(shadow, shadow.checking))
            if not self._tasks:
                await asyncio.sleep(0.05)
        log.warning("audits of session positions up to %d did not settle within %.0fs; released unverified",
                    self.session.position, self.session.step_timeout)

    def take_detection(self) -> Detection | None:
        detection, self.detection = self.detection, None
        return detection

    def rewind(self, position: int) -> None:
        """The session goes back to ``position``: verified marks beyond it no longer mean anything. A check in
        flight whose window starts before ``position`` is clipped there (its inputs and claims before it are still
        the session's: a speculative rollback of rejected drafts costs no audit work); one starting at or beyond it
        is discarded (with every check in flight)."""
        flying = [s for s in self._shadows.values() if s.busy and not s.opening]
        cut = any(s.verified >= position and s.checking > position for s in flying)
        if cut:
            self._epoch += 1
        else:
            for shadow in flying:
                shadow.checking = min(shadow.checking, position)
        self._asked = {hs: min(upto, position) for hs, upto in self._asked.items()}
        for shadow in self._shadows.values():
            shadow.verified = min(shadow.verified, position)
            if shadow.audited not in self.session.hops:  # a replaced hop: its claims beyond are dropped too
                shadow.audited.inputs = truncate_parts(shadow.audited.inputs, position)
                shadow.audited.outputs = truncate_parts(shadow.audited.outputs, position)
                shadow.audited.steps = truncate_steps(shadow.audited.steps, position)
            if cut:
                shadow.busy = False

    def _tol(self, a: HopSession, b: HopSession) -> Tolerance:
        """The tolerance between the servers of ``a`` and ``b`` (their announced dtypes, the route's quant)."""
        hidden = a.outputs[0].shape[-1] if a.outputs else None
        return tolerance_for(a.hop.record.dtype, b.hop.record.dtype, self.quant, hidden)

    # ---- shadows -------------------------------------------------------------------------------

    async def _open_shadow(self, shadow: Shadow, avoid: frozenset[str] = frozenset()) -> None:
        peer_id, span = shadow.audited.hop.peer_id, shadow.audited.hop.span
        shadow.busy = shadow.opening = True
        try:
            hs = await open_one(self.session, self.find, span, {peer_id, *avoid}, shadow.audited.hop.record.dtype)
        finally:
            shadow.busy = shadow.opening = False
        if hs is None:
            self.counters.peer(peer_id).unaudited += 1
            news = self.counters.notices.first(peer_id, span, time.monotonic())
            log.log(logging.INFO if news else logging.DEBUG, "no independent server of blocks %s to audit %s%s",
                    span, shadow.audited.where(), "" if news else " (again)")
            return
        self.counters.notices.forget(peer_id, span)
        shadow.hs = hs
        shadow.verified = 0

    async def _check(self, shadow: Shadow, upto: int) -> None:
        epoch = self._epoch
        audited, hs = shadow.audited, shadow.hs
        assert hs is not None
        a = shadow.verified
        inputs, claims = list(audited.inputs), list(audited.outputs)
        try:
            x = cat_rows(inputs, a, upto)  # [b - a, H]
            claimed = cat_rows(claims, a, upto)
            b = a + x.shape[0]
            if claimed.shape != x.shape or b <= a:
                return
            try:
                recomputed = await replay(self.session, hs, x, a)
            except (MeshinferError, TimeoutError) as err:
                log.info("audit shadow %s failed (%s); %s gets another", hs.where(), err, audited.where())
                await self._drop_shadow(shadow, frozenset({hs.hop.peer_id}))
                return
            if epoch != self._epoch:
                return
            if shadow.checking < b:  # a rewind clipped the window: judge what the session kept
                b = max(a, shadow.checking)
                claimed, recomputed = claimed[:b - a], recomputed[:b - a]
                if b <= a:
                    return
            verdict = judge(claimed, recomputed, self._tol(audited, hs))
            stats = self.counters.peer(audited.hop.peer_id)
            if verdict.ok:
                stats.passed += 1
                stats.positions += b - a
                shadow.verified = b
                return
            assert verdict.first_bad is not None
            log.warning("audit of %s failed on positions [%d, %d): max rel_err %.3g, |signed mean of scale-1| %.3g; "
                        "asking a third server", audited.where(), a, b, verdict.max_rel_err, verdict.mean_scale_dev)
            await self._referee(shadow, inputs, claimed, recomputed, a, b, epoch)
        finally:
            shadow.busy = False

    async def _referee(self, shadow: Shadow, inputs: list[torch.Tensor], claimed: torch.Tensor,
                       recomputed: torch.Tensor, a: int, b: int, epoch: int) -> None:
        audited, verifier = shadow.audited, shadow.hs
        assert verifier is not None
        referee = await open_one(self.session, self.find, audited.hop.span,
                                 {audited.hop.peer_id, verifier.hop.peer_id}, audited.hop.record.dtype)
        if referee is None:
            self.counters.unresolved += 1
            log.warning("no third server of blocks %s to settle the audit of %s; unresolved", audited.hop.span,
                        audited.where())
            await self._drop_shadow(shadow, frozenset({verifier.hop.peer_id}))
            return
        try:
            truth = (await replay(self.session, referee, cat_rows(inputs, 0, b), 0))[a:b]  # [b - a, H]
        except (MeshinferError, TimeoutError) as err:
            self.counters.unresolved += 1
            log.warning("the third server %s failed (%s); the audit is unresolved", referee.where(), err)
            await self._drop_shadow(shadow, frozenset({verifier.hop.peer_id}))
            return
        finally:
            await referee.close(send_timeout=0.5, stream_timeout=0.5)
        if epoch != self._epoch or shadow.checking < b:  # rewound meanwhile: the window is checked again later
            return
        culprit, first = arbitrate(claimed, recomputed, truth, self._tol(audited, referee),
                                   self._tol(verifier, referee))
        now = time.monotonic()
        if culprit == "audited":
            assert first is not None
            length = self.session.bans.ban(audited.hop.peer_id, now)
            self.counters.peer(audited.hop.peer_id).failed += 1
            self.counters.detections += 1
            log.warning("%s LIED from position %d (confirmed by %s); banned for %.0fs", audited.where(), a + first,
                        referee.where(), length)
            self.reporter.publish(audited, a + first, b, referee.hop.record.dtype)
            if self.detection is None or a + first < self.detection.position:
                self.detection = Detection(audited, audited.hop.peer_id, a + first)
            shadow.verified = a + first  # [a, a + first) agree with the referee; the liar's hop is replaced next
            old, shadow.hs = shadow.hs, None
            if old is not None:
                await old.close(send_timeout=0.5, stream_timeout=0.5)
        elif culprit == "verifier":
            length = self.session.bans.ban(verifier.hop.peer_id, now)
            self.counters.peer(verifier.hop.peer_id).failed += 1
            self.counters.lying_verifiers += 1
            log.warning("audit shadow %s LIED (confirmed by %s); banned for %.0fs", verifier.where(),
                        referee.where(), length)
            await self._drop_shadow(shadow, frozenset({verifier.hop.peer_id}))
        else:
            self.counters.unresolved += 1
            log.warning("the third server agrees with %s about %s; unresolved",
                        "both sides" if culprit == "neither" else "neither side", audited.where())
            await self._drop_shadow(shadow, frozenset({verifier.hop.peer_id}))

    async def _drop_shadow(self, shadow: Shadow, avoid: frozenset[str]) -> None:
        old, shadow.hs = shadow.hs, None
        shadow.opening = True
        if old is not None:
            await old.close(send_timeout=0.5, stream_timeout=0.5)
        self._spawn(self._open_shadow(shadow, avoid))

    async def close(self) -> None:
        """Cancel audits in flight and close every shadow (never raises)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for shadow in self._shadows.values():
            if shadow.hs is not None:
                await shadow.hs.close(send_timeout=0.5, stream_timeout=0.5)
