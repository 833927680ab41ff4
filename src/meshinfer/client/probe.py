"""Round trips to candidate servers before any session ran, so the first route is already planned by latency.

Contract: ``RttProbe(node, stats).run(records, now)`` dials, at once, every server of ``records`` that announces a
direct-plane address and that ``stats`` (``client.measured.PeerStats``) has no round trip for yet (at most
``max_probes`` of them; one that gave no figure is not tried again for ``retry_s``): the direct plane's hellos time
one round trip as a side effect of the dial (``MessageStream.dial_rtt_s``), so the probe costs no extra message.
Each figure goes to ``stats.record_rtt``; a server that has not answered within ``wait`` seconds counts as ``wait``
away for this plan (at least that far: the planner then prefers the ones that did; not recorded, it was not reached)
and its dial is given up. The probed connection is not wasted: it sends a ``Ping`` (so the server keeps it beyond
its first-message timeout; the ``Pong`` is skipped by the session that reads it later, ``client.hops``) and goes
back to the node's idle pool (``PeerNode.release_stream``), where the session the plan leads to takes it: the first
generation dials nothing twice. Servers reached only over libp2p are not probed (their first ``Open`` measures them,
as before). Never raises; knows nothing of routes or models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable

from meshinfer.client.measured import PeerStats
from meshinfer.errors import MeshinferError
from meshinfer.p2p import SESSION_PROTOCOL
from meshinfer.p2p.node import PeerNode
from meshinfer.wire.messages import Ping
from meshinfer.wire.records import ServerRecord

log = logging.getLogger(__name__)

PROBE_WAIT_S = 1.0
"""Seconds a plan waits for its probes; a server slower to answer counts as this far away."""
MAX_PROBES = 16
"""Most servers probed for one plan."""
RETRY_S = 60.0
"""Seconds before a server that gave no figure is probed again."""
MAX_TRIED = 4096
"""Servers remembered as probed without a figure (the oldest are forgotten first)."""


async def _probe(node: PeerNode, record: ServerRecord, timeout: float) -> float | None:
    """The dial round trip to ``record``'s server (None: no figure, e.g. a kept connection was reused)."""
    try:
        stream = await node.open_stream(record.peer_id, SESSION_PROTOCOL, direct=record.direct_addresses,
                                        maddrs=record.addresses, timeout=timeout, reuse=True)
    except MeshinferError as err:
        log.debug("probing %s failed: %s", record.peer_id[:12], err)
        return None
    rtt = None if stream.reused else stream.dial_rtt_s
    with contextlib.suppress(MeshinferError):
        if not stream.reused:
            await stream.send(Ping(seq=0))
    await node.release_stream(stream)
    return rtt


class RttProbe:
    """Probes for one client (``SwarmView``): ``run(records, now)`` before each plan (see the module docstring)."""

    def __init__(self, node: PeerNode, stats: PeerStats, *, max_probes: int = MAX_PROBES,
                 wait: float = PROBE_WAIT_S, retry_s: float = RETRY_S) -> None:
        self.node = node
        self.stats = stats
        self.max_probes = max_probes
        self.wait = wait
        self.retry_s = retry_s
        self._tried: dict[str, float] = {}  # peer -> when it was last probed without a figure (oldest first)

    async def run(self, records: Iterable[ServerRecord], now: float) -> dict[str, float]:
        """Probe the servers of ``records`` with no round trip in ``stats`` (none tried within ``retry_s``); the
        figures are recorded in ``stats``; returns the round trips to plan this route on: the measured ones, and
        ``wait`` for those that did not answer in time (at least that far; not recorded: they were not reached)."""
        known = self.stats.rtt()
        todo: dict[str, ServerRecord] = {}
        for record in records:
            peer = record.peer_id
            if (record.direct_addresses and peer not in known and peer != self.node.peer_id
                    and now - self._tried.get(peer, -math.inf) > self.retry_s):
                todo.setdefault(peer, record)
        if not todo:
            return {}
        tasks = {peer: asyncio.create_task(_probe(self.node, r, self.wait), name=f"probe:{peer[:12]}")
                 for peer, r in list(todo.items())[:self.max_probes]}
        _done, pending = await asyncio.wait(tasks.values(), timeout=self.wait)
        out: dict[str, float] = {}
        for peer, task in tasks.items():
            rtt: float | None = None
            if task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                out[peer] = self.wait
            else:
                rtt = task.result()
            if rtt is None:
                self._tried.pop(peer, None)
                self._tried[peer] = now
                while len(self._tried) > MAX_TRIED:
                    del self._tried[next(iter(self._tried))]
            else:
                self.stats.record_rtt(peer, rtt)
                out[peer] = rtt
        return out
