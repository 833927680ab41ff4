"""What a client's audits found, per server peer, and when a shadow check is due: pure bookkeeping (no torch).

Contract: ``AuditCounters`` (one per ``DistributedModel``, shared by every ``client.audit.Auditor`` of its sessions)
tallies audit outcomes per server peer (``PeerAudits``) and the detections, reports and unresolved windows;
``as_dict`` is the JSON summary the swarm table, the dashboard and bench trust show. ``UnauditedNotices`` (its
``notices``) keeps the "no independent server of blocks S to audit P" message from repeating for every session of
a burst: ``first(peer, span, now)`` is True once per (server peer, span) (log it at INFO; False: at DEBUG) until
``forget_after`` seconds passed or ``forget(peer, span)`` (an independent server appeared), so a later recurrence
is told again; at most ``max_entries`` are remembered (the oldest dropped). ``check_due`` is the rule of when a
shadowed hop gets a check. Knows nothing of sessions, shadows, tensors or the network.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field

from meshinfer.types import BlockRange


def check_due(position: int, verified: int, every: int) -> bool:
    """Whether a shadowed hop at ``position`` with claims verified on [0, ``verified``) gets a check now: once
    ``every`` positions are unverified, and at once for the first (the prompt's positions)."""
    return position > verified and (position - verified >= every or verified == 0)


class UnauditedNotices:
    """Which (server peer, span) were lately told to have no independent server to audit them (see the module
    docstring): a bounded memory with expiry."""

    def __init__(self, forget_after: float = 600.0, max_entries: int = 1024) -> None:
        self.forget_after = forget_after
        self.max_entries = max_entries
        self._told: OrderedDict[tuple[str, BlockRange], float] = OrderedDict()
        """(peer, span) -> when it was last told at INFO, oldest first."""

    def first(self, peer_id: str, span: BlockRange, now: float) -> bool:
        """Whether this is news: not told about (``peer_id``, ``span``) within ``forget_after`` seconds of ``now``
        (then it counts as told now)."""
        key = (peer_id, span)
        told = self._told.get(key)
        if told is not None and now - told < self.forget_after:
            return False
        self._told.pop(key, None)
        self._told[key] = now
        while len(self._told) > self.max_entries:
            self._told.popitem(last=False)
        return True

    def forget(self, peer_id: str, span: BlockRange) -> None:
        """An independent server of ``span`` appeared for ``peer_id``: a later absence is news again."""
        self._told.pop((peer_id, span), None)

    def __len__(self) -> int:
        return len(self._told)


@dataclass
class PeerAudits:
    """What audits found about one server peer."""

    passed: int = 0
    """Windows its claims passed."""
    failed: int = 0
    """Windows in which it was found lying (by a referee)."""
    unaudited: int = 0
    """Hops it served that no shadow checked (not sampled, or no independent server of the span)."""
    positions: int = 0
    """Positions of its claims verified."""
    uncommitted: int = 0
    """Audited hops of it whose signed commits were absent, broken or not given when asked (judged anyway, a lie
    there cannot be reported; a server refusing to commit is suspect)."""


@dataclass
class AuditCounters:
    """Audit outcomes per server peer, and the detections, over a client's sessions."""

    peers: dict[str, PeerAudits] = field(default_factory=dict[str, PeerAudits])
    detections: int = 0
    """Audited hops found lying (each: banned, failed over, the generation rolled back)."""
    lying_verifiers: int = 0
    unresolved: int = 0
    """Failed windows no referee could settle."""
    reports: int = 0
    """Detections published as signed reports (evidence others re-verify)."""
    unreportable: int = 0
    """Detections without evidence (the window was not covered by the liar's signed commit; the reason is logged)."""
    notices: UnauditedNotices = field(default_factory=UnauditedNotices, compare=False, repr=False)
    """Which "no independent server" messages were lately logged at INFO (once per peer and span, not per session)."""

    def peer(self, peer_id: str) -> PeerAudits:
        return self.peers.setdefault(peer_id, PeerAudits())

    def as_dict(self) -> dict[str, object]:
        """A JSON-able summary (for the swarm table, the dashboard and bench trust)."""
        return {"detections": self.detections, "lying_verifiers": self.lying_verifiers,
                "unresolved": self.unresolved, "reports": self.reports, "unreportable": self.unreportable,
                "peers": {peer: dataclasses.asdict(audits) for peer, audits in sorted(self.peers.items())}}
