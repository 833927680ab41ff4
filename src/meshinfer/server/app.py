"""Composition root of a block server: checkpoint span + step loop + session service + P2P + DHT.

Contract: ``BlockServer.start(config, p2p)`` has ``server.prepare`` check the checkpoint and the span before
touching the network (bad input: one-line ``MeshinferError``), compute the model id, start a ``PeerNode`` and,
without ``--blocks``, choose its span from the swarm it reads (length from ``--num-blocks`` or memory, start
where the swarm is weakest). It then announces the server as ``joining``, loads only its span's tensors,
measures throughput, serves ``meshinfer/session/1`` and ``meshinfer/push/1``, and announces ``online``
(``ModelCard`` + ``ServerRecord`` through ``p2p.Announcer``). While it runs, ``cache_tokens_left`` is
re-announced (debounced) whenever a session opens or ends (with ``--metrics-port``, Prometheus metrics are
served at ``info()["metrics_url"]``: ``server.metrics``), and an automatically placed server re-checks its
place every ``--rebalance-interval`` s; to move it drains (announces ``draining``, refuses new sessions, lets
open ones finish for up to ``--drain-timeout`` s, ends the rest with an ``Error``), loads the new span,
re-measures and announces ``online`` there. The announced record always names the span being served (or, while
``joining``, about to be). ``stop()`` drains the same way, then stops the step loop and leaves the swarm; it
is idempotent. Since issue 9 the model may also be a model id: ``server.prepare`` fetches config, tokenizer
and then its span's pieces from the swarm's seeders (``weights.fetch.ensure_local``); the server seeds what it
holds. Running it as a process (signals, stdin EOF) is ``server.run``; this module logs, never prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshinfer import __version__
from meshinfer.config import P2PConfig
from meshinfer.errors import MeshinferError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.ops import autotune_linear, layer_weights
from meshinfer.models.quant import weight_bytes
from meshinfer.p2p import SESSION_PROTOCOL
from meshinfer.p2p.announce import Announcer
from meshinfer.p2p.node import NodeSettings, PeerNode
from meshinfer.p2p.stream import StreamSettings
from meshinfer.server.config import ServerConfig
from meshinfer.server.handler import SessionService
from meshinfer.server.memory import MemoryBudget
from meshinfer.server.metrics import ServerMetrics, ServerSample
from meshinfer.server.prepare import prepare, quant_config, read_snapshot
from meshinfer.server.push import PUSH_PROTOCOL, PushPool
from meshinfer.server.rebalance import Rebalancer
from meshinfer.server.runtime import Finished, StepLoop
from meshinfer.server.throughput import TYPICAL_BATCH, Throughput, measure_throughputs
from meshinfer.types import BlockRange
from meshinfer.weights.fetch import ensure_local
from meshinfer.weights.rate import MB
from meshinfer.weights.seed import Seeder, start_seeding
from meshinfer.wire.limits import DEFAULT_LIMITS
from meshinfer.wire.messages import PROTOCOL_VERSION
from meshinfer.wire.records import ModelCard, ServerRecord, ServerState

log = logging.getLogger(__name__)

STATUS_DEBOUNCE = 0.25
"""Seconds to gather session changes into one re-announcement."""
PUBLISH_TIMEOUT = 5.0
"""Most seconds one state change waits for the DHT (the refresh task retries after that)."""
LEAVING_MESSAGE = "server is shutting down (leaving the swarm); open a session elsewhere"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@dataclass
class BlockServer:
    config: ServerConfig
    model_dir: Path
    span_range: BlockRange
    model_id: str
    card: ModelCard
    node: PeerNode
    ckpt: Checkpoint | None = None
    announcer: Announcer | None = None
    loop: StepLoop | None = None
    service: SessionService | None = None
    pool: PushPool | None = None
    throughput: float = 0.0
    measured: Throughput | None = None
    state: ServerState = "joining"
    rebalancer: Rebalancer | None = None
    metrics: ServerMetrics | None = None
    """Prometheus metrics, served at ``metrics.url`` when ``--metrics-port`` is set."""
    metrics_host: str = "127.0.0.1"
    model_ref: str | None = None
    """The model id (or hub name) when the weights are fetched from the swarm; None for a local directory."""
    seeder: Seeder | None = None
    """Serves the pieces this server has on disk to peers fetching the model (``meshinfer.weights``)."""
    fatal: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    """Set when the server can no longer serve (a move failed and the old span could not be reloaded)."""
    _status_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _rebalance_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _status_dirty: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _hurry: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _stopped: bool = False
    weight_bytes: int = 0
    """Bytes of the loaded span's weights, as held (quantized or not); announced."""

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    @property
    def maddrs(self) -> list[str]:
        return self.node.maddrs

    def info(self) -> dict[str, Any]:
        """What launchers and tests need to know once the server is ready (JSON-friendly)."""
        return {"peer_id": self.peer_id, "maddrs": self.maddrs, "model_id": self.model_id,
                "model_name": self.card.name, "blocks": str(self.span_range),
                "num_blocks": self.card.num_blocks, "dtype": self.config.dtype, "quant": self.config.quant,
                "weight_bytes": self.weight_bytes,
                "throughput": round(self.throughput, 2), "cache_tokens": self.config.cache_tokens,
                "torch_threads": _torch_threads(), "state": self.state,
                "auto_placement": self.config.auto_placement,
                "batch_throughput": round(self.measured.batch, 2) if self.measured else 0.0,
                "batch_size": self.measured.batch_size if self.measured else 0,
                "metrics_url": self.metrics.url if self.metrics is not None else None}

    def record(self) -> ServerRecord:
        left = self.service.budget.tokens_left if self.service is not None else self.config.cache_tokens
        return ServerRecord(
            peer_id=self.peer_id, model_id=self.model_id, span=self.span_range, state=self.state,
            throughput=self.throughput, cache_tokens_left=left, addresses=self.maddrs[:16],
            direct_addresses=self.node.direct_addresses[:8],
            sessions=len(self.service.sessions) if self.service is not None else 0,
            queued_steps=self.loop.queued_steps if self.loop is not None else 0,
            batch_throughput=self.measured.batch if self.measured is not None else 0.0,
            batch_size=self.measured.batch_size if self.measured is not None else 0,
            software_version=__version__, public_name=self.config.public_name, protocol_version=PROTOCOL_VERSION,
            quant=self.config.quant, weight_bytes=self.weight_bytes,
        )

    # ---- start -------------------------------------------------------------------------------

    @classmethod
    async def start(cls, config: ServerConfig, p2p: P2PConfig, model_dir: str | Path | None = None) -> BlockServer:
        """Check, join the swarm, place, load, measure, serve and announce; see the module docstring."""
        if config.torch_threads is not None:
            import torch

            torch.set_num_threads(config.torch_threads)  # process-wide: the step loop's worker thread uses it
            log.info("torch uses %d compute threads", torch.get_num_threads())
        read_timeout = max(3600.0, 2 * config.session_idle_timeout)  # idle sessions are expired by the service
        settings = NodeSettings(stream=StreamSettings(read_timeout=read_timeout, limits=DEFAULT_LIMITS))
        model_ref = str(model_dir or config.model)
        ready = await prepare(config, p2p, model_ref, settings)
        server = cls(config, ready.model_dir, ready.span, ready.model_id, ready.card, ready.node, ckpt=ready.ckpt,
                     metrics_host=p2p.host, model_ref=model_ref if ready.fetched else None)
        try:
            await server._serve()
        except BaseException:
            await server.stop()
            raise
        return server

    async def _serve(self) -> None:
        cfg = self.config
        log.info("peer %s joined the swarm at %s", self.peer_id, ", ".join(self.maddrs))
        if cfg.metrics_port is not None:
            self.metrics = ServerMetrics()
            url = self.metrics.serve(self.metrics_host, cfg.metrics_port, asyncio.get_running_loop(),
                                     self.metrics_sample)
            log.info("Prometheus metrics at %s", url)
        self.announcer = Announcer(self.node, self.card, self.record(), ttl=cfg.announce_ttl,
                                   refresh=cfg.announce_refresh)
        await self.announcer.start()
        log.info("announced model %s (%s) blocks %s as joining", self.card.name, self.model_id, self.span_range)
        await self._load_and_serve()
        try:
            max_upload = cfg.max_upload * MB if cfg.max_upload is not None else None
            self.seeder = await start_seeding(self.node, self.model_dir, max_upload=max_upload)
        except MeshinferError as err:  # seeding is a service to others: serving goes on without it
            log.warning("cannot seed the pieces of %s: %s", self.model_dir, err)
        self._status_task = asyncio.create_task(self._announce_status(), name="announce-status")
        if cfg.auto_placement and cfg.rebalance_interval > 0:
            self.rebalancer = Rebalancer(
                read=lambda: read_snapshot(self.node, self.model_id, self.card.num_blocks), move=self.move,
                me=self.record, num_blocks=self.card.num_blocks, interval=cfg.rebalance_interval,
                balance_quality=cfg.balance_quality)
            self._rebalance_task = asyncio.create_task(self.rebalancer.run(), name="rebalance")
            log.info("will re-check the placement every %g s (+-20%%)", cfg.rebalance_interval)

    async def _load_and_serve(self) -> None:
        """Load ``span_range``, measure it, (re)start serving it and announce ``online``."""
        cfg = self.config
        assert self.ckpt is not None
        t0 = time.perf_counter()
        span = await asyncio.to_thread(self.ckpt.load_span, self.span_range, cfg.dtype, "cpu", quant_config(cfg))
        self.weight_bytes = weight_bytes(span)
        await asyncio.to_thread(autotune_linear, layer_weights(span))  # once per process: oneDNN or MKL
        log.info("loaded blocks %s (%s, weights %s: %.1f MB) in %.2f s", self.span_range, cfg.dtype, cfg.quant,
                 self.weight_bytes / 1e6, time.perf_counter() - t0)
        loop = StepLoop(span, self._on_results, limits=DEFAULT_LIMITS)
        loop.on_step = self.metrics.on_step if self.metrics is not None else None
        self.loop = loop
        measured = await loop.call(measure_throughputs, span, TYPICAL_BATCH)
        self.measured, self.throughput = measured, measured.single
        log.info("measured %.1f decode tokens/s for blocks %s (%.1f aggregate at %d sessions)",
                 measured.single, self.span_range, measured.batch, measured.batch_size)
        if self.service is None:
            self.service = SessionService(
                model_id=self.model_id, peer_id=self.peer_id, steps=loop,
                budget=MemoryBudget(cfg.cache_tokens, cfg.max_sessions), limits=DEFAULT_LIMITS,
                max_step_tokens=cfg.max_step_tokens, idle_timeout=cfg.session_idle_timeout,
                on_change=self._status_dirty.set, quant=cfg.quant,
            )
            self.pool = PushPool(self.node, self.service.on_push_error, settings=self.node.settings.stream)
            self.service.delivery.pool = self.pool
            loop.start()
            self.service.start()
            await self.node.handle(SESSION_PROTOCOL, self.service.handle_session)
            await self.node.handle(PUSH_PROTOCOL, self.service.handle_push)
        else:  # after a move: the same service (its handlers and push streams stay) on the new span's loop
            self.service.steps = loop
            self.service.accepting = True
            loop.start()
            self.service.start()
        self.state = "online"
        await self._publish_now()
        log.info("online: serving blocks %s of %s to sessions (%d tokens of KV cache, at most %d sessions)",
                 self.span_range, self.card.name, cfg.cache_tokens, cfg.max_sessions)

    async def _publish_now(self) -> None:
        """Publish the current record at once (not through the refresh task: no racing duplicate); a DHT
        that does not answer in time is logged and left to the refresh task."""
        assert self.announcer is not None
        self.announcer.record = self.record()
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await self.announcer.publish()
        except (TimeoutError, MeshinferError) as err:
            log.warning("could not announce %s blocks %s now (%s); the refresh will retry",
                        self.state, self.span_range, str(err) or "timeout")

    def metrics_sample(self) -> ServerSample:
        """The levels ``ServerMetrics`` exports (read on the server's event loop)."""
        service, cfg = self.service, self.config
        left = service.budget.tokens_left if service is not None else cfg.cache_tokens
        return ServerSample(
            sessions_open=len(service.sessions) if service is not None else 0,
            queued_steps=self.loop.queued_steps if self.loop is not None else 0,
            kv_tokens_used=cfg.cache_tokens - left, kv_tokens_capacity=cfg.cache_tokens,
            throughput=self.throughput, state=self.state, peer_id=self.peer_id, model_id=self.model_id,
            model_name=self.card.name, span=str(self.span_range), version=__version__)

    def _on_results(self, finished: list[Finished]) -> None:
        assert self.service is not None
        self.service.on_results(finished)

    async def _announce_status(self) -> None:
        """Re-announce ``cache_tokens_left`` after sessions come and go (at most every debounce)."""
        assert self.announcer is not None
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
        if self.service is not None:
            self.service.accepting = False
        if self.announcer is not None:
            await self._publish_now()
        if self.service is None:
            return
        open_now = len(self.service.sessions)
        if open_now:
            log.info("draining blocks %s: waiting up to %g s for %d open sessions to end", self.span_range,
                     self.config.drain_timeout, open_now)
            deadline = time.monotonic() + self.config.drain_timeout
            while self.service.sessions and not self._hurry.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(0.1, max(0.0, deadline - time.monotonic()))):
                        await self._hurry.wait()
            if self.service.sessions:
                log.info("draining blocks %s: ending %d sessions that did not finish in time", self.span_range,
                         len(self.service.sessions))
            else:
                log.info("draining blocks %s: every session ended", self.span_range)
        await self.service.shutdown(message)

    async def move(self, target: BlockRange) -> None:
        """Drain, then serve ``target`` instead (back to the old span if that fails; ``fatal`` if both do)."""
        old = self.span_range
        log.info("moving from blocks %s to %s", old, target)
        await self._drain(f"server is moving from blocks {old} to {target}; open a session elsewhere")
        if self.loop is not None:
            await self.loop.stop()
        for span in (target, old):
            self.span_range, self.state = span, "joining"
            await self._publish_now()
            try:
                if self.model_ref is not None:  # fetch the new span's pieces first, then seed them too
                    self.model_dir = await ensure_local(self.node, self.model_ref, blocks=span, client_part=False,
                                                        max_download=self.config.max_download_bytes)
                    self.ckpt = await asyncio.to_thread(Checkpoint, self.model_dir)
                    if self.seeder is not None:
                        await self.seeder.add(self.model_dir)
                await self._load_and_serve()
            except Exception:
                log.exception("could not serve blocks %s", span)
                if self.loop is not None:
                    await self.loop.stop()
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
        for task in (self._rebalance_task, self._status_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await self._drain(LEAVING_MESSAGE)
        except Exception:
            log.warning("error while draining", exc_info=True)
        for step in (self.announcer.stop if self.announcer else None,
                     self.seeder.close if self.seeder else None,
                     self.loop.stop if self.loop else None,
                     self.pool.close if self.pool else None,
                     self.node.close):
            if step is None:
                continue
            try:
                await step()
            except Exception:
                log.warning("error while stopping", exc_info=True)
        if self.metrics is not None:
            self.metrics.stop()
        log.info("stopped")
