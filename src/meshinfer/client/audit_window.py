"""One audited hop's shadow record, and where the window of its next check ends (design D4: judge what was signed).

Contract: ``Shadow`` is ``client.audit.Auditor``'s record of one audited hop: the shadow session (None: none), the
positions verified, whether a check is in flight and up to where, and why the hop's claims cannot be bound by its
signed commits (then judged anyway). ``window_end(shadow, upto, final, asked, counters)`` says where a check
wanting positions up to ``upto`` ends: the end of the hop's latest signed commit (``client.evidence.committed_upto``);
``upto`` when no commit will cover more (``final``: the generation's end or a replaced hop; or the hop's commits are
absent or broken, or it did not commit up to ``asked`` when asked: counted ``PeerAudits.uncommitted``, logged as
suspect); None: wait for the commit. It logs under ``meshinfer.client.audit`` (the auditor's logger). Knows nothing
of scheduling, shadows' servers, verdicts or bans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from meshinfer.client.audit_tally import AuditCounters
from meshinfer.client.evidence import committed_upto
from meshinfer.client.hops import HopSession

log = logging.getLogger("meshinfer.client.audit")


@dataclass(eq=False)
class Shadow:
    """One audited hop's shadow: its session, how far the hop's claims are verified, the check in flight."""

    audited: HopSession
    hs: HopSession | None = None
    """The shadow's session (None: none found; the hop is unaudited)."""
    opening: bool = False
    """A shadow is being found and opened (the hop's claims count as unverified meanwhile)."""
    verified: int = 0
    """Positions [0, verified) of the audited hop's claims agree with the shadow's."""
    busy: bool = False
    uncommitted: str | None = None
    """Why the audited hop's claims cannot be bound by its signed commits (judged anyway; None: they can)."""
    checking: int = 0
    """The end of the window of the check in flight (while ``busy``); a rewind into the window clips it."""


def window_end(shadow: Shadow, upto: int, final: bool, asked: int, counters: AuditCounters) -> int | None:
    """Where a check of ``shadow``'s hop wanting positions up to ``upto`` ends: the end of the hop's latest
    signed commit; ``upto`` itself when no commit will cover more (``final``: the generation's end or a
    replaced hop; or the hop does not commit properly); None: wait for the commit. ``asked``: the end of the
    latest step that asked the hop for a signed commit; a hop found not committing is counted in ``counters``."""
    audited = shadow.audited
    committed, stuck = committed_upto(audited)
    if committed >= upto or shadow.uncommitted is not None:
        return upto
    its_fault = audited.commits is None or audited.commits.broken is not None  # else: a rollback cut a step
    if stuck is None and committed < asked <= sum(out.shape[0] for out in audited.outputs):
        stuck, its_fault = f"no signed commit up to position {asked} when asked (it covers {committed})", True
    if stuck is not None:
        shadow.uncommitted = stuck
        if its_fault:
            counters.peer(audited.hop.peer_id).uncommitted += 1
            log.warning("%s: %s; its claims are judged, but a lie there cannot be reported (suspect)",
                        audited.where(), stuck)
        else:
            log.info("%s: %s; its claims from %d on are judged, but a lie there cannot be reported",
                     audited.where(), stuck, committed)
        return upto
    if final:
        log.info("positions [%d, %d) of %s are not covered by its signed commit: judged, but a lie there cannot "
                 "be reported", max(committed, shadow.verified), upto, audited.where())
        return upto
    return committed if committed > shadow.verified else None
