"""The dashboard's credits panel data (issue 23): work served and used per peer, from receipts only.

Contract: ``read_credits(node, doc, timeout)`` asks every server listed in a swarm document (``dashboard.doc``)
for the usage receipts it holds (``ledger.fetch.collect``: every signature verified here, the newest receipt per
session) and returns ``ledger.report.credits_doc`` (per peer: served, used, credit, sessions, the served rate
measured over the last hour, labelled so) with ``read_at``. Never raises for an unreachable server (it is listed
under ``asked`` with why). ``CreditsCache`` keeps the latest and says when a new read is due (every
``every`` s: receipts change slowly and a read asks every server); the reader runs it in the background.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CREDITS_EVERY_S = 30.0


async def read_credits(node: Any, doc: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    from meshinfer.ledger.fetch import collect
    from meshinfer.ledger.report import credits_doc

    servers: dict[str, tuple[str, ...]] = {}
    names: dict[str, str] = {}
    for model in doc.get("models", []):
        for server in model.get("servers", []):
            servers[server["peer_id"]] = tuple(server.get("addresses") or ())
            if server.get("public_name"):
                names[server["peer_id"]] = server["public_name"]
    now = time.time()
    book, shown = await collect(node, list(servers.items()), now=now, timeout=timeout)
    return {**credits_doc(book.receipts(), shown, names, now), "read_at": now}


@dataclass
class CreditsCache:
    every: float = CREDITS_EVERY_S
    latest: dict[str, Any] | None = None
    _at: float = -1e18

    def due(self, now: float) -> bool:
        return now - self._at >= self.every

    def mark(self, now: float) -> None:
        """A read started at ``now`` (the next one is due ``every`` s later)."""
        self._at = now
