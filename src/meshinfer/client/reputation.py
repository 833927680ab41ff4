"""Reputation: what a client believes about servers' honesty, as pure inputs to the route planner (issue 19, D5).

Contract: ``Reputation`` keeps, per peer, when this client first saw it announce (``observe``), how many steps it
served this client (``served``) and the VERIFIED reports against it (``add_report``: only after
``client.reports.verify_report`` said so; a report is counted once per (reporter, accused, session)). Two outputs:

- ``reported()``: peers with a verified report; routes avoid them like bans (``SwarmView.plan`` excludes them).
- ``trust(peer, now)`` in [``MIN_TRUST``, 1]: a new identity starts at ``MIN_TRUST`` and grows to 1 with the
  larger of its observed age (full after ``FULL_AGE_S``) and the steps it served this client (full after
  ``FULL_STEPS``), in ``LEVELS`` steps (so servers seen minutes apart weigh the same: plans among young servers are
  exactly as without reputation). The planner divides a server's cost factor by it (``client.routing``), so
  between two otherwise equal servers an established one is preferred, yet a lone new server is still used.

What it stops: a server caught once (a verified, signed report) is avoided by every client that reads the report,
under every route, until the report expires from the DHT (reporters re-publish while they run). What it does NOT
stop: a Sybil with many fresh identities (each starts at ``MIN_TRUST``: it gets traffic only where established
servers are missing or loaded, and each one caught costs it that identity, but identities are free); a liar that
only lies where nobody audits (audit_fraction < 1) keeps its reputation until sampled; collusion of ALL servers of
a span (no honest recomputation exists: audits and report verification both need one honest server of the span, or
the verifier's own weights); false reports cannot hurt an honest server (they fail verification), but a flood of
them costs verifiers recomputation (bounded: one verification per report subkey, blobs bounded in size).
Pure: no I/O, no torch; times are given by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshinfer.types import PeerIdStr

MIN_TRUST = 0.25
"""The trust of an identity this client has just seen."""
FULL_AGE_S = 3600.0
"""Seconds of observed announcing after which a peer's trust is full."""
FULL_STEPS = 1000
"""Steps served to this client after which a peer's trust is full."""
LEVELS = 4
"""Trust grows in this many equal steps (a quarter of ``FULL_AGE_S`` or ``FULL_STEPS`` each)."""


@dataclass
class Reputation:
    first_seen: dict[PeerIdStr, float] = field(default_factory=dict[PeerIdStr, float])
    steps: dict[PeerIdStr, int] = field(default_factory=dict[PeerIdStr, int])
    reports: dict[PeerIdStr, set[tuple[PeerIdStr, str]]] = field(default_factory=dict[PeerIdStr, set[tuple[str, str]]])
    """accused -> {(reporter, session id)} of verified reports."""

    def observe(self, peers: Iterable[PeerIdStr], now: float) -> None:
        """``peers`` announce now (the first sighting starts their age)."""
        for peer in peers:
            self.first_seen.setdefault(peer, now)

    def served(self, peer: PeerIdStr, steps: int = 1) -> None:
        self.steps[peer] = self.steps.get(peer, 0) + max(0, steps)

    def set_served(self, peer: PeerIdStr, steps: int) -> None:
        """``peer`` served this client ``steps`` steps so far (e.g. ``PeerStats.steps``; never lowers the count)."""
        self.steps[peer] = max(self.steps.get(peer, 0), steps)

    def add_report(self, accused: PeerIdStr, reporter: PeerIdStr, session_id: str) -> bool:
        """Count a verified report; False when it was counted already."""
        seen = self.reports.setdefault(accused, set())
        key = (reporter, session_id)
        if key in seen:
            return False
        seen.add(key)
        return True

    def reported(self) -> set[PeerIdStr]:
        """Peers with at least one verified report (routes avoid them)."""
        return {peer for peer, reports in self.reports.items() if reports}

    def report_count(self, peer: PeerIdStr) -> int:
        return len(self.reports.get(peer, ()))

    def trust(self, peer: PeerIdStr, now: float) -> float:
        """``MIN_TRUST`` for a new identity, growing to 1 with observed age or steps served (0 when reported)."""
        if self.reports.get(peer):
            return 0.0
        seen = self.first_seen.get(peer)
        age = 0.0 if seen is None else max(0.0, now - seen)
        grown = max(min(1.0, age / FULL_AGE_S), min(1.0, self.steps.get(peer, 0) / FULL_STEPS))
        return MIN_TRUST + (1.0 - MIN_TRUST) * math.floor(grown * LEVELS) / LEVELS

    def trust_map(self, peers: Iterable[PeerIdStr], now: float) -> dict[PeerIdStr, float]:
        return {peer: self.trust(peer, now) for peer in peers}
