"""``SwarmPoller``: keeps the dashboard's view of the swarm fresh in the background.

Contract: the poller runs on the event loop of the node it reads through (a ``LoopThread`` for
``meshinfer dashboard``, the client's loop inside the gateway) and is the only writer of the latest payload;
HTTP handlers on any thread read it with ``snapshot()``/``snapshot_json()`` (an immutable pair swapped
atomically: no lock, no await, never blocked by the DHT). Every ``interval`` s it reads the swarm document
through a ``SwarmReader`` (``NodeSwarmReader``: a client-mode ``PeerNode``), then measures round trips to the
servers that are due (``rtt.RttCache``) in a separate task, at most ``ping_concurrency`` at once and
``pings_per_round`` per round, so a slow or dead server never delays the next read. The reader is made by
``connect()`` on first use and made again after a failure to join, so a dashboard started before its swarm
is reachable recovers by itself. Failures never raise: they become the payload's ``error`` ("why the swarm
cannot be read"; the last good models stay, marked by their older ``updated_at``). A read that gets no answer
at all (no model directory within the timeout) is an error too; an answered read listing no model is the
empty state, not an error. ``gateway_audits`` (inside ``meshinfer api``: the gateway's client's
``AuditCounters.as_dict``, called on the poller's loop, the client's) adds that client's live audit counts to
every payload (``doc.dashboard_payload``). Every 30 s the reader also collects the servers' usage receipts
(``dashboard.credits``) into the document's ``credits`` (issue 23).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol

from meshinfer.config import P2PConfig
from meshinfer.dashboard.credits import CreditsCache, read_credits
from meshinfer.dashboard.doc import dashboard_payload, swarm_doc
from meshinfer.dashboard.rtt import RttCache, ping_server
from meshinfer.errors import ConfigError
from meshinfer.loopthread import run_on
from meshinfer.tasks import stop_task

log = logging.getLogger(__name__)

JOIN_PREFIX = "cannot join the swarm: "


class SwarmReader(Protocol):
    """Reads the swarm for the poller (all methods run on the poller's loop)."""

    @property
    def viewer(self) -> str | None:
        """The peer id of the node reading (round trips are measured from it)."""
        ...

    async def read(self) -> dict[str, Any]:
        """The swarm document (``dashboard.doc``)."""
        ...

    async def ping(self, server: Mapping[str, Any]) -> float:
        """Seconds of one round trip to a server entry of the document (raises when unreachable)."""
        ...

    async def close(self) -> None: ...


@dataclass(eq=False)
class NodeSwarmReader:
    """A ``SwarmReader`` over a started ``PeerNode`` (its own, or one it shares, e.g. the gateway's)."""

    node: Any
    _: KW_ONLY
    timeout: float = 5.0
    ping_timeout: float = 3.0
    owns_node: bool = False
    credits: CreditsCache = field(default_factory=CreditsCache)
    _credits_task: asyncio.Task[None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.ping_timeout <= 0:
            raise ConfigError("timeouts must be > 0 seconds")

    @classmethod
    async def join(cls, config: P2PConfig, *, timeout: float = 5.0, ping_timeout: float = 3.0,
                   startup_timeout: float = 30.0) -> NodeSwarmReader:
        """Join through ``config.initial_peers`` as a client-mode peer (stores nothing for others)."""
        from meshinfer.p2p.node import NodeSettings, PeerNode

        node = await PeerNode.start(config, NodeSettings(client_mode=True, startup_timeout=startup_timeout))
        return cls(node, timeout=timeout, ping_timeout=ping_timeout, owns_node=True)

    @property
    def viewer(self) -> str | None:
        return str(self.node.peer_id)

    async def read(self) -> dict[str, Any]:
        doc = await swarm_doc(self.node, self.timeout)
        now = time.monotonic()
        if self.credits.due(now) and (self._credits_task is None or self._credits_task.done()):
            # every 30 s, in the background: it asks every server for its receipts (dashboard.credits), which must
            # not hold up the swarm view
            self.credits.mark(now)
            self._credits_task = asyncio.create_task(self._read_credits(doc), name="dashboard-credits")
        doc["credits"] = self.credits.latest
        return doc

    async def _read_credits(self, doc: dict[str, Any]) -> None:
        try:
            self.credits.latest = await read_credits(self.node, doc, self.timeout)
        except Exception as err:  # the swarm view must not fail for the credits panel
            log.info("cannot read the swarm's receipts: %s", err)
            self.credits.latest = {"error": str(err) or type(err).__name__}

    async def ping(self, server: Mapping[str, Any]) -> float:
        return await ping_server(self.node, server, timeout=self.ping_timeout)

    async def close(self) -> None:
        await stop_task(self._credits_task)
        if self.owns_node:
            await self.node.close()


def _reason(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text[len(JOIN_PREFIX):] if text.startswith(JOIN_PREFIX) else text


class SwarmPoller:
    """The latest dashboard payload, refreshed every ``interval`` s by a task on the reader's loop."""

    def __init__(self, connect: Callable[[], Awaitable[SwarmReader]], *, interval: float = 2.0, rtt: bool = True,
                 ping_concurrency: int = 8, pings_per_round: int = 32, rtt_max_age: float = 30.0,
                 clock: Callable[[], float] = time.time,
                 gateway_audits: Callable[[], Mapping[str, Any]] | None = None) -> None:
        if not interval > 0:
            raise ConfigError(f"refresh interval must be > 0 seconds, got {interval}")
        if ping_concurrency <= 0 or pings_per_round <= 0:
            raise ConfigError("ping_concurrency and pings_per_round must be > 0")
        self.connect = connect
        self.interval = interval
        self.rtt_enabled = rtt
        self.ping_concurrency = ping_concurrency
        self.pings_per_round = pings_per_round
        self.rtt = RttCache(max_age=rtt_max_age, retry_after=max(rtt_max_age / 2, interval))
        self.clock = clock
        self.gateway_audits = gateway_audits
        self.reader: SwarmReader | None = None
        self.reads = 0
        self.failures = 0
        self.last_read_s: float | None = None
        self._doc: dict[str, Any] | None = None
        self._error: str | None = None
        self._updated_at: float | None = None
        self._checked_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._latest: tuple[dict[str, Any], bytes] = ({}, b"{}")
        self._publish()  # the "loading" payload: nothing read yet

    # ---- reading the latest (any thread) -------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The latest ``/api/swarm`` payload (do not modify it)."""
        return self._latest[0]

    def snapshot_json(self) -> bytes:
        """The latest payload as JSON bytes."""
        return self._latest[1]

    # ---- refreshing (the poller's loop) --------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        viewer = self.reader.viewer if self.reader is not None else None
        own = None
        if self.gateway_audits is not None:
            try:
                own = self.gateway_audits()
            except Exception as err:  # never let the counters break the page
                log.debug("cannot read the gateway's audit counters: %s", err)
        return dashboard_payload(self._doc, rtt_ms=self.rtt.rtt_ms(), error=self._error, updated_at=self._updated_at,
                                 checked_at=self._checked_at, viewer=viewer, interval=self.interval,
                                 gateway_audits=own)

    def _publish(self) -> None:
        payload = self._payload()
        self._latest = (payload, json.dumps(payload).encode())

    async def refresh_once(self) -> None:
        """Read the swarm once (joining first if needed), publish, and start a round of pings if due."""
        started = time.monotonic()
        self._checked_at = self.clock()
        try:
            if self.reader is None:
                self.reader = await self.connect()
            doc = await self.reader.read()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.failures += 1
            self._error = _reason(err)
            log.info("cannot read the swarm: %s", self._error)
        else:
            self.reads += 1
            if not doc.get("complete", True) and not doc.get("models"):
                self.failures += 1
                self._error = "no peer of the swarm answered the DHT read in time"
            else:
                self._doc, self._error, self._updated_at = doc, None, self._checked_at
                self.rtt.forget_others(s["peer_id"] for m in doc["models"] for s in m["servers"])
        self.last_read_s = time.monotonic() - started
        self._publish()
        if self.rtt_enabled and self._doc is not None and (self._ping_task is None or self._ping_task.done()):
            self._ping_task = asyncio.create_task(self._ping_round(), name="dashboard-pings")

    async def _ping_round(self) -> None:
        reader, doc = self.reader, self._doc
        if reader is None or doc is None:
            return
        servers = {s["peer_id"]: s for m in doc["models"] for s in m["servers"]}
        due = self.rtt.due(servers, time.monotonic(), self.pings_per_round)
        if not due:
            return
        gate = asyncio.Semaphore(self.ping_concurrency)

        async def one(peer: str) -> None:
            async with gate:
                try:
                    rtt: float | None = await reader.ping(servers[peer])
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    log.debug("ping to %s failed: %s", peer[:16], err)
                    rtt = None
                self.rtt.record(peer, rtt, time.monotonic())

        await asyncio.gather(*(one(p) for p in due))
        self._publish()

    async def run(self) -> None:
        """Refresh every ``interval`` s until cancelled."""
        while True:
            started = time.monotonic()
            await self.refresh_once()
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None, timeout: float = 10.0) -> SwarmPoller:
        """Refresh in the background on ``loop`` (called from another thread; waits until the task exists),
        or on the running loop when None."""
        if self._task is not None:
            return self

        async def begin() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self.run(), name="dashboard-poller")

        if loop is None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self.run(), name="dashboard-poller")
        else:
            run_on(loop, begin(), timeout)
        return self

    async def aclose(self) -> None:
        """Stop refreshing and close the reader (on the poller's loop; idempotent)."""
        for task in (self._task, self._ping_task):
            if task is not None and not task.done():
                await stop_task(task, errors=(Exception,))
        self._task = self._ping_task = None
        reader, self.reader = self.reader, None
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.close()

    def stop(self, timeout: float = 15.0) -> None:
        """``aclose`` from another thread (the poller's loop must still run)."""
        if self._loop is None or self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            run_on(self._loop, self.aclose(), timeout)
