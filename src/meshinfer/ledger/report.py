"""The credits document (issue 23): per peer, work served and used, from receipts only. Pure.

Contract: ``credits_doc(receipts, shown, names, now)`` turns verified, de-duplicated receipts (a ``Book``'s) into
one JSON-friendly document that ``meshinfer credits`` prints and the dashboard shows: per peer, block-tokens served
and used, credit (served - used), sessions, and a **measured** rate: block-tokens served per hour over the
receipts issued in the last ``window_s`` seconds (labelled as such; no projection beyond what was measured), plus,
per asked server, how many receipts it showed or why it could not be asked. Receipts are the only source: nothing
a peer claims about itself enters the figures. No I/O, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from meshinfer.ledger.book import balances
from meshinfer.wire.receipts import Receipt

RATE_WINDOW_S = 3600.0


def credits_doc(receipts: Iterable[Receipt], shown: Mapping[str, int | str], names: Mapping[str, str], now: float,
                *, window_s: float = RATE_WINDOW_S) -> dict[str, Any]:
    held = list(receipts)
    totals = balances(held)
    recent: dict[str, int] = {}
    for r in held:
        if now - r.issued <= window_s:
            recent[r.server] = recent.get(r.server, 0) + r.work
    peers: list[dict[str, Any]] = []
    for peer, b in sorted(totals.items(), key=lambda kv: (-kv[1].credit, kv[0])):
        peers.append({
            "peer_id": peer, "name": names.get(peer), "served": b.served, "used": b.used, "credit": b.credit,
            "sessions_served": b.sessions_served, "sessions_used": b.sessions_used,
            "served_per_hour_measured": round(recent.get(peer, 0) * 3600.0 / window_s),
        })
    return {
        "unit": "block-tokens (one token through one transformer block)",
        "source": "receipts signed by clients, verified here; a peer's own claims are not used",
        "rate_window_s": window_s,
        "receipts": len(held),
        "asked": {peer: shown[peer] for peer in sorted(shown)},
        "peers": peers,
    }
