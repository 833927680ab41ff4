"""``SwarmView``: what a client knows of the swarm: who serves which blocks, and how far away they are.

Contract: owns one client-mode ``PeerNode`` (it reads and writes DHT records but stores nothing for
others) joined through ``initial_peers``. ``coverage(model)`` reads every block key of a model in ONE
bounded DHT call (``meshinfer.p2p.read_coverage``) and caches the result; a cached view younger than
``max_age`` is reused, ``refresh=True`` forces a read, and ``start_refresh`` keeps it fresh in the
background. ``plan(model)`` turns the view into a route with the pure planner (``client.routing``; one quant
mode per route: ``quant``, else the model reference's, else the most precise mode that covers the model),
re-reading for a short while when the swarm does not cover the model yet (records take a moment to
appear), and raises ``NoRouteError`` naming the model and the missing blocks. What sessions measure (Open
round trips, per-hop step times) and what ``probe`` measures before a plan (``client.probe``: the dial round trip
of candidates not measured yet) goes into ``stats`` (``client.measured.PeerStats``) and the planner routes on
it: announced throughput is only a prior capped at ``prior_cap`` times the median, and with ``spread`` each
plan draws its tie-breaks at random (weighted by speed and announced free capacity) so that clients spread
over equivalent servers. ``bans`` (``PeerBans``) are shared by the view's sessions: failing peers back off
briefly (exponentially), peers whose record proved false are banned for ``refuted_ban`` s, growing 4x per
repeat up to ``MAX_REFUTED_BAN_S``. ``reputation`` (``client.reputation``): every server read in a coverage is
observed (a new identity starts below established ones: the planner divides its cost factor by its trust), and
peers with a VERIFIED report are never routed to. ``report(blob)`` publishes evidence against a server (the blob is
served by this view's peer on ``meshinfer/evidence/1``); ``check_reports(model)`` reads the model's reports and
verifies each new one (``client.reports``: fetch the blob from its reporter, check it, recompute the span through
servers that are neither accused nor reporter, a report found true confirmed through a second disjoint route when
the swarm has one, or with the ``recompute`` given) before believing it. All methods run
on the event loop the view was started on. Outside reports, knows nothing of tensors or models beyond ids and block
counts (the report machinery is imported when first used). ``stop_refresh(model_id)`` ends one model's
background refresh (a model closed while others share the view).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshinfer.client.measured import PeerStats
from meshinfer.client.probe import RttProbe
from meshinfer.client.reputation import Reputation
from meshinfer.client.routing import PRIOR_CAP, NoRouteError, RouteHop, plan_uniform_route
from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError, TransportError
from meshinfer.p2p.announce import Coverage, read_coverage
from meshinfer.p2p.node import NodeSettings, PeerNode
from meshinfer.types import BlockRange, PeerIdStr, check_quant
from meshinfer.weights.bans import PeerBans
from meshinfer.wire.records import ReportRecord

if TYPE_CHECKING:
    from meshinfer.client.report_service import EvidenceStore
    from meshinfer.client.reports import Recompute
    from meshinfer.wire.evidence import EvidenceBlob

log = logging.getLogger(__name__)

REFUTED_BAN_FACTOR = 4.0
"""Each new ban of a peer whose record proved false lasts this many times its previous one..."""
MAX_REFUTED_BAN_S = 3600.0
"""...up to this many seconds."""


@dataclass(frozen=True)
class ModelRef:
    """What the view needs to know about a model: its id (fingerprint), a name for messages, its size, and the
    quant mode of the servers its routes may use (None: any one mode, the most precise that covers it)."""

    model_id: str
    num_blocks: int
    name: str = ""
    quant: str | None = None

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise ConfigError(f"a model needs at least one block, got {self.num_blocks}")
        if self.quant is not None:
            object.__setattr__(self, "quant", check_quant(self.quant))

    def describe(self) -> str:
        short = self.model_id[:12]
        return f"{self.name} ({short})" if self.name and self.name != self.model_id else short


def check_initial_peers(initial_peers: Sequence[str]) -> tuple[str, ...]:
    """The peers as a tuple, or a ConfigError for an empty list or something that is not a multiaddr."""
    peers = tuple(str(p).strip() for p in initial_peers)
    if not peers:
        raise ConfigError("initial_peers is required to use a swarm: give the multiaddr of any of its peers")
    bad = [p for p in peers if not p.startswith("/") or "/p2p/" not in p]
    if bad:
        raise ConfigError(f"invalid initial peer {bad[0]!r}: expected a multiaddr like "
                          "/ip4/1.2.3.4/tcp/31337/p2p/Qm...")
    return peers


@dataclass
class _Cached:
    coverage: Coverage
    read_at: float


class SwarmView:
    """A client's cached view of the swarm, backed by a client-mode peer."""

    def __init__(self, node: PeerNode, *, dht_timeout: float = 5.0, max_age: float = 10.0,
                 prior_cap: float = PRIOR_CAP, spread: bool = True, refuted_ban: float = 60.0,
                 rng: random.Random | None = None) -> None:
        if dht_timeout <= 0 or max_age < 0:
            raise ConfigError("dht_timeout must be > 0 and max_age >= 0")
        if not prior_cap >= 1:
            raise ConfigError(f"--prior-cap must be >= 1, got {prior_cap:g}")
        self.node = node
        self.dht_timeout = dht_timeout
        self.max_age = max_age
        self.prior_cap = prior_cap
        self.rng = (rng or random.Random()) if spread else None
        """Draws each plan's tie-breaks (None: deterministic plans)."""
        self.bans = PeerBans(ban_s=refuted_ban, ban_factor=REFUTED_BAN_FACTOR,
                             ban_max_s=max(refuted_ban, MAX_REFUTED_BAN_S))
        """Peers that failed this client recently (backing off) or whose record proved false (banned); sessions
        report them, routes avoid them until it ends."""
        self.stats = PeerStats()
        """What this client measured of the servers it used (routes are planned on it)."""
        self.probe = RttProbe(node, self.stats)
        """Measures the round trip of candidate servers not measured yet, before a plan (``client.probe``)."""
        self.reputation = Reputation()
        """Servers' age as seen by this client and the verified reports against them (``client.reputation``)."""
        self.report_outcomes: dict[bytes, str] = {}
        self._unchecked: dict[bytes, tuple[int, float]] = {}  # blob sha -> (failed tries, monotonic next try)
        """Blob hash of each report checked -> ``verified``, ``false`` or why it could not be checked."""
        self._evidence: EvidenceStore | None = None
        self._published: list[ReportRecord] = []
        self._renewer: asyncio.Task[None] | None = None
        self._cache: dict[str, _Cached] = {}
        self._refreshers: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    @classmethod
    async def join(cls, initial_peers: Sequence[str], *, host: str = "127.0.0.1", identity: str | None = None,
                   dht_timeout: float = 5.0, max_age: float = 10.0, startup_timeout: float = 30.0,
                   prior_cap: float = PRIOR_CAP, spread: bool = True, refuted_ban: float = 60.0,
                   mdns: bool = True, mdns_browse_s: float = 3.0, swarm_key: str | None = None,
                   swarm_allow: str | None = None) -> SwarmView:
        """Start a client-mode peer joined through ``initial_peers`` (TransportError if none answers); with none
        and ``mdns``, through the peers found on this LAN by mDNS within ``mdns_browse_s`` (TransportError naming
        the way out when there are none)."""
        if not initial_peers and mdns:
            from meshinfer.p2p.discovery import find_lan_peers
            from meshinfer.p2p.lanpeers import join_maddrs, no_peers_message
            from meshinfer.p2p.membership import swarm_label

            found = await find_lan_peers(mdns_browse_s, swarm=swarm_label(swarm_key, swarm_allow))
            if not found:
                raise TransportError(no_peers_message(mdns_browse_s))
            initial_peers = join_maddrs(found)
        peers = check_initial_peers(initial_peers)
        config = P2PConfig(host=host, port=0, identity=identity, initial_peers=peers, mdns=mdns,
                           mdns_browse_s=mdns_browse_s, swarm_key=swarm_key,
                           swarm_allow=swarm_allow)
        node = await PeerNode.start(config, NodeSettings(client_mode=True, startup_timeout=startup_timeout))
        try:
            return cls(node, dht_timeout=dht_timeout, max_age=max_age, prior_cap=prior_cap, spread=spread,
                       refuted_ban=refuted_ban)
        except BaseException:
            await node.close()
            raise

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    # ---- coverage ------------------------------------------------------------------------------

    async def coverage(self, model: ModelRef, *, refresh: bool = False) -> Coverage:
        """The servers of every block of ``model``: cached unless older than ``max_age`` or ``refresh``."""
        cached = self._cache.get(model.model_id)
        if not refresh and cached is not None and time.monotonic() - cached.read_at <= self.max_age:
            return cached.coverage
        cov = await read_coverage(self.node, model.model_id, model.num_blocks, timeout=self.dht_timeout)
        self._cache[model.model_id] = _Cached(cov, time.monotonic())
        self.reputation.observe(cov.servers, time.monotonic())
        log.debug("coverage of %s: %d servers, blocks %s", model.describe(), len(cov.servers), cov.counts())
        return cov

    def age(self, model_id: str) -> float | None:
        """Seconds since ``model_id``'s coverage was last read (None if never)."""
        entry = self._cache.get(model_id)
        return None if entry is None else time.monotonic() - entry.read_at

    def cached(self, model_id: str) -> Coverage | None:
        """The last coverage read for ``model_id`` (None if never read)."""
        entry = self._cache.get(model_id)
        return entry.coverage if entry else None

    def start_refresh(self, model: ModelRef, interval: float = 10.0) -> None:
        """Re-read ``model``'s coverage every ``interval`` s in the background until ``close``."""
        if interval <= 0:
            raise ConfigError(f"refresh interval must be > 0, got {interval}")
        if model.model_id in self._refreshers:
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self.coverage(model, refresh=True)
                except Exception as err:  # a failed refresh keeps the old view
                    log.debug("background refresh of %s failed: %s", model.describe(), err)

        self._refreshers[model.model_id] = asyncio.create_task(loop(), name=f"refresh:{model.model_id[:12]}")

    async def stop_refresh(self, model_id: str) -> None:
        """Stop the background refresh of ``model_id`` (started by ``start_refresh``; none: a no-op)."""
        task = self._refreshers.pop(model_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---- round trips ---------------------------------------------------------------------------

    def record_rtt(self, peer_id: PeerIdStr, seconds: float) -> None:
        """Feed one measured round trip to ``peer_id`` into its smoothed estimate."""
        self.stats.record_rtt(peer_id, seconds)

    @property
    def rtt(self) -> dict[PeerIdStr, float]:
        """Smoothed round trips (seconds) of the peers measured so far."""
        return self.stats.rtt()

    # ---- routes --------------------------------------------------------------------------------

    async def plan(self, model: ModelRef, *, blocks: BlockRange | None = None, exclude: Iterable[PeerIdStr] = (),
                   wait: float = 3.0, quant: str | None = None) -> list[RouteHop]:
        """A route over ``blocks`` (default: the whole model) avoiding ``exclude`` and banned peers, on servers
        of one quant mode (``quant``, else ``model.quant``, else the most precise that covers); retries for
        ``wait`` s while none exists."""
        wanted = blocks or BlockRange(0, model.num_blocks)
        deadline = time.monotonic() + wait
        refresh = False
        while True:
            cov = await self.coverage(model, refresh=refresh)
            now = time.monotonic()
            for peer in cov.servers:
                self.reputation.set_served(peer, self.stats.steps(peer))
            excluded = set(exclude) | self.bans.avoided(now) | self.reputation.reported()  # re-read: backoffs end
            far = await self.probe.run([r for p, r in cov.servers.items() if p not in excluded], now)
            try:
                return plan_uniform_route(cov.servers.values(), wanted, quant=quant or model.quant,
                                          rtt_s={**far, **self.stats.rtt()}, exclude=excluded,
                                          measured=self.stats.block_seconds(now),
                                          prior_cap=self.prior_cap, rng=self.rng,
                                          trust=self.reputation.trust_map(cov.servers, now))
            except NoRouteError as err:
                if time.monotonic() >= deadline:
                    raise NoRouteError(_no_route_message(err, model, cov)) from None
            refresh = True
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # ---- reports -------------------------------------------------------------------------------

    async def report(self, blob: EvidenceBlob, *, verifier_dtype: str = "") -> ReportRecord:
        """Publish ``blob`` (evidence that its accused lied, established by this client's own audit) and stop
        routing to the accused."""
        from meshinfer.client.report_service import EvidenceStore, publish_report

        if self._evidence is None:
            self._evidence = EvidenceStore()
        record = await publish_report(self.node, self._evidence, blob, verifier_dtype=verifier_dtype)
        self.reputation.add_report(record.accused, record.reporter, record.session_id)
        self.report_outcomes[record.blob_sha256] = "verified"
        self._published.append(record)
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_reports(), name="renew-reports")
        return record

    async def _renew_reports(self) -> None:
        """Re-announce this view's reports every half TTL while their blobs are still stored (served)."""
        from meshinfer.client.report_service import REPORT_TTL_S, announce_report

        while True:
            await asyncio.sleep(REPORT_TTL_S / 2)
            store = self._evidence
            self._published = [r for r in self._published if store is not None and r.blob_sha256 in store.blobs]
            for record in self._published:
                try:
                    await announce_report(self.node, record)
                except Exception as err:  # the next round tries again
                    log.debug("renewing the report against %s failed: %s", record.accused[:12], err)

    async def check_reports(self, model: ModelRef, *, recompute: Recompute | None = None,
                            limit: int = 8) -> list[tuple[ReportRecord, str]]:
        """Read ``model``'s reports and verify up to ``limit`` new ones (see the module docstring; one that could
        not be checked is retried after a growing pause, behind fresh ones); each checked report and its outcome
        (``verified``, ``false``, ``disputed``, or why it was rejected or could not be checked)."""
        from meshinfer.client.report_service import fetch_evidence, read_reports
        from meshinfer.client.reports import ReportRejected, verify_report

        out: list[tuple[ReportRecord, str]] = []
        now = time.monotonic()
        # reports that could not be checked back off (2, 4, ... 300 s) and queue behind fresh ones: records whose
        # reporter is gone (or never answers) must not take every round's ``limit`` and starve the new ones
        todo = [r for r in await read_reports(self.node, model.model_id, timeout=self.dht_timeout)
                if r.blob_sha256 not in self.report_outcomes and r.reporter != self.peer_id
                and self._unchecked.get(r.blob_sha256, (0, 0.0))[1] <= now]
        todo.sort(key=lambda r: self._unchecked.get(r.blob_sha256, (0, 0.0))[0])
        for record in todo[:limit]:
            try:
                data = await fetch_evidence(self.node, record)
                if recompute is not None:
                    verdict = await verify_report(record, data, recompute)
                    outcome = "verified" if verdict.verified else "false"
                else:
                    outcome = await self._verify_remotely(model, record, data)
            except ReportRejected as err:
                outcome = f"rejected: {err}"
            except Exception as err:  # unreachable reporter, no independent server: try again later
                log.info("report against %s not checked: %s", record.accused[:12], err)
                tries = self._unchecked.get(record.blob_sha256, (0, 0.0))[0] + 1
                self._unchecked[record.blob_sha256] = (tries, time.monotonic() + min(300.0, 2.0**tries))
                out.append((record, f"unchecked: {err}"))
                continue
            self._unchecked.pop(record.blob_sha256, None)
            self.report_outcomes[record.blob_sha256] = outcome
            if outcome == "verified":
                self.reputation.add_report(record.accused, record.reporter, record.session_id)
                log.warning("verified report: server %s returned wrong outputs for blocks %s (reported by %s)",
                            record.accused[:12], record.span, record.reporter[:12])
            out.append((record, outcome))
        return out

    async def _verify_remotely(self, model: ModelRef, record: ReportRecord, data: bytes) -> str:
        """``verified``/``false`` by recomputing through servers that are neither accused nor reporter; a report
        found true is confirmed through a second, disjoint route when one exists (a lying recomputer must not frame
        an honest server): ``disputed`` when the two disagree (not believed)."""
        from meshinfer.client.report_service import remote_recompute
        from meshinfer.client.reports import verify_report

        avoid = {record.accused, record.reporter}
        first = await self._independent_route(model, record, avoid)
        how = remote_recompute(self.node, first, model_id=model.model_id, dtype=record.dtype, quant=record.quant)
        if not (await verify_report(record, data, how, _least_precise(first))).verified:
            return "false"
        try:
            second = await self._independent_route(model, record, avoid | {h.peer_id for h in first})
        except NoRouteError:
            return "verified"  # one independent server only: believed (docs: a lying recomputer is a limit)
        how = remote_recompute(self.node, second, model_id=model.model_id, dtype=record.dtype, quant=record.quant)
        return "verified" if (await verify_report(record, data, how, _least_precise(second))).verified else "disputed"

    async def _independent_route(self, model: ModelRef, record: ReportRecord, avoid: set[PeerIdStr]
                                 ) -> list[RouteHop]:
        """A route over the report's span avoiding ``avoid``; when the cached coverage has none, once more on a
        fresh read (a server that joined since, or a partial read, must not leave a report unchecked or, for the
        confirming route, believed on one recomputer's word)."""
        try:
            return await self.plan(model, blocks=record.span, exclude=avoid, quant=record.quant, wait=0.0)
        except NoRouteError:
            await self.coverage(model, refresh=True)
            return await self.plan(model, blocks=record.span, exclude=avoid, quant=record.quant, wait=0.0)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop background refreshes and leave the swarm (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewer
        for task in self._refreshers.values():
            task.cancel()
        for task in self._refreshers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._refreshers.clear()
        await self.node.close()

    async def __aenter__(self) -> SwarmView:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _least_precise(route: Sequence[RouteHop]) -> str:
    """The compute dtype of ``route`` for a tolerance: a half-precision one if any hop computes in one."""
    dtypes = [h.record.dtype for h in route]
    return next((d for d in dtypes if d != "float32"), "float32")


def _no_route_message(err: NoRouteError, model: ModelRef, cov: Coverage) -> str:
    """``no online servers cover blocks 4:8 of model NAME (ID)`` plus a hint on what to do."""
    text = re.sub(r" of the requested (\S+)", lambda m: f" of model {model.describe()}"
                  + ("" if m.group(1) == f"0:{model.num_blocks}" else f" (requested {m.group(1)})"), str(err), count=1)
    if not cov.servers:
        text += "; no server of this model was found in the swarm (start one with `meshinfer serve`)"
    if not cov.complete:
        text += "; some DHT reads timed out, so the view may be incomplete"
    return text
