"""Composition root of a block server: checkpoint span + step loop + session service + P2P + DHT.

Contract: ``BlockServer.start(config, p2p)`` first resolves ``--device``/``--dtype`` on this machine
(``server.device.open_device``: a missing device is a one-line ``ConfigError`` before anything else), then has
``server.prepare`` check the checkpoint and the span before touching the network (bad input: one-line
``MeshinferError``), compute the model id, start a ``PeerNode`` and, without ``--blocks``, choose its span from
the swarm it reads (length from ``--num-blocks`` or memory, start where the swarm is weakest). It then announces
the server as ``joining``, loads only its span's tensors on the device, measures throughput, sizes an unset
``--cache-tokens`` on a GPU from the memory left (``server.device.size_cache``; ``config`` holds the resolved
values from then on), serves ``meshinfer/session/1`` and ``meshinfer/push/1``, and announces ``online``
(``ModelCard`` + ``ServerRecord`` through ``p2p.Announcer``). While it runs, ``cache_tokens_left`` is
re-announced (debounced) whenever a session opens or ends (with ``--metrics-port``, Prometheus metrics are
served at ``info()["metrics_url"]``: ``server.metrics``), and an automatically placed server re-checks its
place every ``--rebalance-interval`` s; to move it drains (announces ``draining``, refuses new sessions, lets
open ones finish for up to ``--drain-timeout`` s, ends the rest with an ``Error``), loads the new span,
re-measures and announces ``online`` there. An owner-aware server (``--when idle``, ``--schedule``:
``server.owner_watch``) drains the same way when its owner needs the machine (``pause``), stays ``draining`` with
the span loaded, and announces ``online`` again when the owner is idle (``resume``). The announced record always
names the span being served (or, while ``joining``, about to be). ``stop()`` drains the same way, then stops the
step loop and leaves the swarm; it is idempotent. A started ``BlockServer`` is complete: announcer, session
service, push pool and ``serving`` (``server.serving.Serving``: the span loaded, its step loop and measurements)
all exist; a move swaps ``serving`` as one, the service and its protocol handlers stay. Since issue 9 the model may
also be a model id: ``server.prepare`` fetches config, tokenizer and then its span's pieces from the swarm's
seeders (``weights.fetch.ensure_local``); the server seeds what it holds. Since issue 22 every server relays sealed
requests (``meshinfer/sealed-relay/1``, unless ``--no-sealed-relay``), and one started with ``--sealed`` on the
whole model also loads the head and takes them (``meshinfer/sealed/1``, ``server.sealed``), announcing its sealing
key in the record while online on [0, n). Since issue 23 it keeps clients' usage receipts (``--credits``:
``server.receipts``) and weighs decode slots by credit. Running it as a process (signals, stdin EOF) is
``server.run``; this module logs, never prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from meshinfer.config import P2PConfig
from meshinfer.errors import MeshinferError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.p2p import SESSION_PROTOCOL
from meshinfer.p2p.announce import Announcer
from meshinfer.p2p.node import NodeSettings
from meshinfer.p2p.stream import StreamSettings
from meshinfer.server.config import ServerConfig
from meshinfer.server.device import describe, open_device, size_cache
from meshinfer.server.handler import SessionService
from meshinfer.server.memory import MemoryBudget, PeerLimits
from meshinfer.server.metrics import ServerMetrics, ServerSample
from meshinfer.server.owner import OwnerGate, threads_for
from meshinfer.server.owner_watch import OwnerWatch
from meshinfer.server.prepare import prepare, read_snapshot
from meshinfer.server.push import PUSH_PROTOCOL, PushPool
from meshinfer.server.rebalance import Rebalancer
from meshinfer.server.receipts import ReceiptDesk, open_desk
from meshinfer.server.sealed import FullNode, SealedRelay, SealedService, start_sealed
from meshinfer.server.serving import Identity, Serving, load_serving, publish
from meshinfer.tasks import stop_task
from meshinfer.types import BlockRange
from meshinfer.weights.fetch import ensure_local
from meshinfer.weights.rate import MB
from meshinfer.weights.seed import Seeder, start_seeding
from meshinfer.wire.limits import DEFAULT_LIMITS, limits_for_model
from meshinfer.wire.records import ServerRecord, ServerState

log = logging.getLogger(__name__)

STATUS_DEBOUNCE = 0.25
"""Seconds to gather session changes into one re-announcement."""
LEAVING_MESSAGE = "server is shutting down (leaving the swarm); open a session elsewhere"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@dataclass
class BlockServer:
    """A started block server (``start``): everything it serves with exists; a move swaps ``serving``."""

    config: ServerConfig
    who: Identity
    model_dir: Path
    ckpt: Checkpoint
    model_ref: str | None
    """The model id (or hub name) when the weights are fetched from the swarm; None for a local directory."""
    announcer: Announcer
    service: SessionService
    pool: PushPool
    serving: Serving
    """The span loaded, its step loop and measurements (the last loaded: stopped while a move is under way)."""
    span_range: BlockRange
    """The announced span: the one served or, while ``joining``, about to be."""
    metrics: ServerMetrics | None
    """Prometheus metrics, served at ``metrics.url`` when ``--metrics-port`` is set."""
    state: ServerState = "joining"
    seeder: Seeder | None = None
    """Serves the pieces this server has on disk to peers fetching the model (None: seeding failed)."""
    rebalancer: Rebalancer | None = None
    """Re-checks the placement (automatically placed servers with ``--rebalance-interval`` > 0)."""
    sealed: SealedService | None = None
    """Takes sealed requests (``--sealed`` on a full node whose head loaded; ``server.sealed``)."""
    relay: SealedRelay | None = None
    """Relays other peers' sealed requests (unless ``--no-sealed-relay``)."""
    _head: Any = field(default=None, repr=False)
    """The embeddings and LM head (``models.head.ClientHead``), loaded for sealed requests only."""
    fatal: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    """Set when the server can no longer serve (a move failed and the old span could not be reloaded)."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)
    _status_dirty: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _hurry: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _stopped: bool = False
    owner: OwnerWatch | None = None
    """Watches the owner's load and ``--schedule`` (``--when idle`` or ``--schedule`` given)."""
    paused: str | None = None
    desk: ReceiptDesk | None = None
    """Takes and shows the receipts clients sign for this server's work (``--credits``; None: off)."""
    """Why the server gave the machine back to its owner (None: it serves)."""

    def info(self) -> dict[str, Any]:
        """What launchers and tests need to know once the server is ready (JSON-friendly)."""
        measured, who = self.serving.measured, self.who
        return {"peer_id": who.node.peer_id, "maddrs": who.node.maddrs, "model_id": who.model_id,
                "model_name": who.card.name, "blocks": str(self.span_range),
                "num_blocks": who.card.num_blocks, "dtype": self.config.dtype, "quant": self.config.quant,
                "device": str(who.device.device), "device_label": who.device.label,
                "weight_bytes": self.serving.weight_bytes,
                "throughput": round(measured.single, 2), "cache_tokens": self.config.kv_budget,
                "torch_threads": _torch_threads(), "state": self.state,
                "auto_placement": self.config.auto_placement,
                "batch_throughput": round(measured.batch, 2), "batch_size": measured.batch_size,
                "sealed": self.sealed is not None, "sealed_relay": self.relay is not None,
                "paused": self.paused,
                "metrics_url": self.metrics.url if self.metrics is not None else None}

    def record(self) -> ServerRecord:
        record = self.who.record(self.span_range, self.state, self.serving, self.service)
        if self.sealed is not None and self.full_node() is not None:  # the key is signed with the record
            record = msgspec.structs.replace(record, sealing_key=self.sealed.key.public_bytes.hex())
        return record

    def full_node(self) -> FullNode | None:
        """What sealed generations run on now: None unless the head is loaded, the server is online and the span
        loaded and announced is the whole model."""
        whole = BlockRange(0, self.who.card.num_blocks)
        if self._head is None or self.state != "online" or self.span_range != whole or self.serving.span != whole:
            return None
        return FullNode(self.ckpt.spec, self.serving.steps, self._head)

    def metrics_sample(self) -> ServerSample:
        """The levels ``ServerMetrics`` exports (read on the server's event loop)."""
        return self.who.sample(self.span_range, self.state, self.serving, self.service)

    # ---- start -------------------------------------------------------------------------------

    @classmethod
    async def start(cls, config: ServerConfig, p2p: P2PConfig, model_dir: str | Path | None = None) -> BlockServer:
        """Check, join the swarm, place, load, measure, serve and announce; see the module docstring."""
        threads = config.torch_threads
        if config.max_load is not None:
            threads = threads_for(config.max_load, os.cpu_count() or 1)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)  # process-wide: the step loop's worker thread uses it
            log.info("torch uses %d compute threads", torch.get_num_threads())
        # A stream silent for longer than a session may idle has no live session left (the service expires
        # them); frames and messages keep StreamSettings' short timeouts.
        settings = NodeSettings(stream=StreamSettings(idle_timeout=config.session_idle_timeout + 30.0,
                                                      limits=DEFAULT_LIMITS))
        model_ref = str(model_dir or config.model)
        config, device = open_device(config)  # before the network: a missing device fails at once
        ready = await prepare(config, p2p, model_ref, settings)
        log.info("serving on %s (%s), computing in %s", describe(device), device.device, config.dtype)
        who = Identity(config, ready.node, ready.model_id, ready.card, device)
        log.info("peer %s joined the swarm at %s", who.node.peer_id, ", ".join(who.node.maddrs))
        metrics = ServerMetrics() if config.metrics_port is not None else None
        server: BlockServer | None = None
        announcer: Announcer | None = None
        first: Serving | None = None
        desk: ReceiptDesk | None = None
        try:
            if metrics is not None and config.metrics_port is not None:
                def sample() -> ServerSample:
                    if server is not None:
                        return server.metrics_sample()
                    return who.sample(ready.span, "joining", first, None)

                url = metrics.serve(p2p.host, config.metrics_port, asyncio.get_running_loop(), sample)
                log.info("Prometheus metrics at %s", url)
            announcer = Announcer(who.node, who.card, who.record(ready.span, "joining", None, None),
                                  ttl=config.announce_ttl, refresh=config.announce_refresh)
            await announcer.start()
            log.info("announced model %s (%s) blocks %s as joining", who.card.name, who.model_id, ready.span)
            desk = await open_desk(config, who.node)
            first = await load_serving(config, ready.ckpt, ready.span,
                                       lambda finished: service.on_results(finished), metrics, device,
                                       desk.credit if desk is not None else None)
            config = size_cache(config, first.steps.span, device)  # the KV budget is known from here on
            who = replace(who, config=config)
            pool = PushPool(who.node, lambda err: service.on_push_error(err), settings=who.node.settings.stream)
            service = SessionService(
                model_id=who.model_id, peer_id=who.node.peer_id, steps=first.steps,
                budget=MemoryBudget(config.kv_budget, config.max_sessions,
                                    PeerLimits(config.peer_sessions, config.peer_tokens)),
                limits=DEFAULT_LIMITS, max_step_tokens=config.max_step_tokens,
                idle_timeout=config.session_idle_timeout, quant=config.quant, pool=pool,
                max_queued_steps_per_peer=config.max_queued_steps_per_peer, identity=who.node.identity)
            server = cls(config, who, ready.model_dir, ready.ckpt, model_ref if ready.fetched else None, announcer,
                         service, pool, first, ready.span, metrics)
            service.on_change = server._status_dirty.set
            server.desk, desk = desk, None
            await server._serve()
        except BaseException:
            if server is not None:
                await server.stop()
            else:
                await _abandon(who, ready.span, announcer, first, metrics)
            if desk is not None:
                await desk.close()
            raise
        return server

    async def _serve(self) -> None:
        """Serve the loaded span and the protocols, announce ``online``, seed, start the background tasks."""
        self._start_serving()
        stream = self.who.node.settings.stream  # messages no larger than this model's largest Step
        stream = replace(stream, limits=limits_for_model(self.who.card.hidden_size, self.config.max_step_tokens,
                                                         stream.limits))
        await self.who.node.handle(SESSION_PROTOCOL, self.service.handle_session, stream)
        await self.who.node.handle(PUSH_PROTOCOL, self.service.handle_push, stream)
        await self._serve_sealed()
        await self._announce_online()
        cfg = self.config
        try:
            max_upload = cfg.max_upload * MB if cfg.max_upload is not None else None
            self.seeder = await start_seeding(self.who.node, self.model_dir, max_upload=max_upload)
        except MeshinferError as err:  # seeding is a service to others: serving goes on without it
            log.warning("cannot seed the pieces of %s: %s", self.model_dir, err)
        self._tasks.append(asyncio.create_task(self._announce_status(), name="announce-status"))
        if cfg.auto_placement and cfg.rebalance_interval > 0:
            self.rebalancer = Rebalancer(
                read=lambda: read_snapshot(self.who.node, self.who.model_id, self.who.card.num_blocks), move=self.move,
                me=self.record, num_blocks=self.who.card.num_blocks, interval=cfg.rebalance_interval,
                balance_quality=cfg.balance_quality)
            self._tasks.insert(0, asyncio.create_task(self.rebalancer.run(), name="rebalance"))
            log.info("will re-check the placement every %g s (+-20%%)", cfg.rebalance_interval)
        if cfg.owner_aware:
            self.owner = OwnerWatch(OwnerGate(cfg.owner_policy()), self.pause, self.resume)
            self._tasks.append(asyncio.create_task(self.owner.run(), name="owner-watch"))
            log.info("owner-aware: --when %s%s", cfg.when, f", --schedule {cfg.schedule!r}" if cfg.schedule else "")

    async def _serve_sealed(self) -> None:
        """The sealed relay and, with ``--sealed`` on a full node, sealed requests (``server.sealed.start_sealed``)."""
        self.relay, self.sealed, self._head = await start_sealed(
            self.config, self.who.node, span=self.span_range, num_blocks=self.who.card.num_blocks,
            model_name=self.who.card.name, model_id=self.who.model_id, ckpt=self.ckpt, device=self.who.device.device,
            full=self.full_node, budget=lambda: self.service.budget)

    def _start_serving(self) -> None:
        """Start the step loop of ``serving`` and the session service over it."""
        self.service.steps = self.serving.steps
        self.service.accepting = True
        self.serving.steps.start()
        self.service.start()

    async def _announce_online(self) -> None:
        cfg = self.config
        self.state = "online"
        await self._publish_now()
        log.info("online: serving blocks %s of %s to sessions (%d tokens of KV cache, at most %d sessions)",
                 self.span_range, self.who.card.name, cfg.kv_budget, cfg.max_sessions)

    async def _publish_now(self) -> None:
        await publish(self.announcer, self.record())

    async def _announce_status(self) -> None:
        """Re-announce ``cache_tokens_left`` after sessions come and go (at most every debounce)."""
        while True:
            await self._status_dirty.wait()
            await asyncio.sleep(STATUS_DEBOUNCE)
            self._status_dirty.clear()
            if self.state == "online":
                self.announcer.update(self.record())

    # ---- drain and move ------------------------------------------------------------------------

    def hurry(self) -> None:
        """End a drain in progress now (e.g. on a second Ctrl-C) instead of waiting for sessions."""
        self._hurry.set()

    async def _drain(self, message: str) -> None:
        """Announce ``draining``, refuse new sessions, wait up to ``--drain-timeout`` s for open ones to
        end, then end the rest with ``Error(overloaded, message)`` so their clients fail over."""
        self.state = "draining"
        self.service.accepting = False
        # the deadline counts from now, not from when the DHT took the announcement (a slow DHT must not let
        # sessions run on past --drain-timeout): announce concurrently, end sessions on time, then await it
        deadline = time.monotonic() + self.config.drain_timeout
        announced = asyncio.create_task(self._publish_now())
        try:
            await self._wait_sessions(deadline)
            await self.service.shutdown(message)
        finally:
            await announced

    async def _wait_sessions(self, deadline: float) -> None:
        """Wait until no session is open, a hurry is asked for, or ``deadline`` (monotonic) passes."""
        open_now = len(self.service.sessions)
        if open_now:
            log.info("draining blocks %s: waiting up to %.3g s for %d open sessions to end", self.span_range,
                     max(0.0, deadline - time.monotonic()), open_now)
            while self.service.sessions and not self._hurry.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(0.1, max(0.0, deadline - time.monotonic()))):
                        await self._hurry.wait()
            if self.service.sessions:
                log.info("draining blocks %s: ending %d sessions that did not finish in time", self.span_range,
                         len(self.service.sessions))
            else:
                log.info("draining blocks %s: every session ended", self.span_range)

    async def pause(self, reason: str) -> None:
        """Give the machine back: drain (announced ``draining``, so clients fail over and another server can place
        itself on the span), then stay announced as ``draining`` and take no sessions until ``resume``. The span
        stays loaded (no CPU while no step runs), so coming back costs no reload."""
        if self.paused is not None or self._stopped:
            return
        self.paused = reason
        await self._drain(f"the machine's owner needs it back ({reason}); open a session elsewhere")

    async def resume(self) -> None:
        """Serve again after ``pause``: take sessions and announce ``online``."""
        if self.paused is None or self._stopped:
            return
        self.paused = None
        self.service.accepting = True
        self.service.start()
        await self._announce_online()

    async def move(self, target: BlockRange) -> None:
        """Drain, then serve ``target`` instead (back to the old span if that fails; ``fatal`` if both do)."""
        if self.paused is not None:
            return  # the owner has the machine: no move until it serves again
        old = self.span_range
        log.info("moving from blocks %s to %s", old, target)
        await self._drain(f"server is moving from blocks {old} to {target}; open a session elsewhere")
        await self.serving.steps.stop()
        for span in (target, old):
            self.span_range, self.state = span, "joining"
            await self._publish_now()
            try:
                if self.model_ref is not None:  # fetch the new span's pieces first, then seed them too
                    self.model_dir = await ensure_local(self.who.node, self.model_ref, blocks=span, client_part=False,
                                                        max_download=self.config.max_download_bytes)
                    self.ckpt = await asyncio.to_thread(Checkpoint, self.model_dir)
                    if self.seeder is not None:
                        await self.seeder.add(self.model_dir)
                self.serving = await load_serving(self.config, self.ckpt, span, self.service.on_results, self.metrics,
                                                  self.who.device, self.desk.credit if self.desk else None)
                self._start_serving()
                await self._announce_online()
            except Exception:
                log.exception("could not serve blocks %s", span)
                await self.serving.steps.stop()
                continue
            if span == target:
                log.info("moved from blocks %s to %s", old, span)
            return
        log.error("cannot serve any blocks any more; stopping")
        self.fatal.set()

    # ---- stop --------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Drain and leave: stop rebalancing, drain (see ``_drain``), stop serving (idempotent, never raises)."""
        if self._stopped:
            return
        self._stopped = True
        log.info("stopping: draining blocks %s", self.span_range)
        for task in self._tasks:
            await stop_task(task)
        try:
            await self._drain(LEAVING_MESSAGE)
        except Exception:
            log.warning("error while draining", exc_info=True)
        await _close_all((self.announcer.stop, self.seeder.close if self.seeder else None, self.serving.steps.stop,
                          self.pool.close, self.desk.close if self.desk else None, self.who.node.close), self.metrics)


async def _close_all(closers: tuple[Callable[[], Awaitable[None]] | None, ...], metrics: ServerMetrics | None) -> None:
    """Run each closer in turn (a failing one is logged), then stop serving metrics; never raises."""
    for close in closers:
        if close is None:
            continue
        try:
            await close()
        except Exception:
            log.warning("error while stopping", exc_info=True)
    if metrics is not None:
        metrics.stop()
    log.info("stopped")


async def _abandon(who: Identity, span: BlockRange, announcer: Announcer | None, serving: Serving | None,
                   metrics: ServerMetrics | None) -> None:
    """Undo a start that failed before its server was complete, as ``BlockServer.stop`` would (never raises)."""
    log.info("stopping: draining blocks %s", span)
    if announcer is not None:
        try:
            await publish(announcer, who.record(span, "draining", serving, None))
        except Exception:
            log.warning("error while draining", exc_info=True)
    await _close_all((announcer.stop if announcer else None, serving.steps.stop if serving else None,
                      who.node.close), metrics)
