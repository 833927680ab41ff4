"""Composition root of a block server: checkpoint span + step loop + session service + P2P + DHT.

Contract: ``BlockServer.start(config, p2p)`` checks the checkpoint and the span before touching the
network (bad input: one-line ``MeshinferError``), computes the model id
(``models.fingerprint.checkpoint_fingerprint``), starts a ``PeerNode``, announces the server as
``joining``, loads only its span's tensors, measures throughput, serves ``meshinfer/session/1`` and
``meshinfer/push/1``, and announces ``online`` (``ModelCard`` + ``ServerRecord`` through
``p2p.Announcer``). While it runs, ``cache_tokens_left`` is re-announced (debounced) whenever a
session opens or ends. ``stop()`` announces ``draining``, stops refreshing, ends every session
(clients get an ``Error``), stops the step loop and leaves the swarm; it is idempotent.
``serve_until_signal`` wraps all of it for the CLI: SIGTERM/SIGINT (and optionally stdin EOF), even
during start-up, lead to a clean stop. Printing is the caller's job (``on_ready``); this module logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshinfer import __version__
from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError, MeshinferError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.fingerprint import checkpoint_fingerprint
from meshinfer.p2p import SESSION_PROTOCOL
from meshinfer.p2p.announce import Announcer
from meshinfer.p2p.node import NodeSettings, PeerNode
from meshinfer.p2p.stream import StreamSettings
from meshinfer.server.config import ServerConfig
from meshinfer.server.handler import SessionService
from meshinfer.server.memory import MemoryBudget
from meshinfer.server.push import PUSH_PROTOCOL, PushPool
from meshinfer.server.runtime import StepLoop
from meshinfer.server.throughput import measure_throughput
from meshinfer.types import DTYPES, BlockRange, canonical_dtype
from meshinfer.wire.limits import DEFAULT_LIMITS
from meshinfer.wire.messages import PROTOCOL_VERSION
from meshinfer.wire.records import ModelCard, ServerRecord, ServerState

log = logging.getLogger(__name__)

STATUS_DEBOUNCE = 0.25
"""Seconds to gather session changes into one re-announcement."""


def _card_dtype(spec_dtype: str | None, fallback: str) -> str:
    with contextlib.suppress(ConfigError, AttributeError):
        name = canonical_dtype(spec_dtype or "")
        if name in DTYPES:
            return name
    return fallback


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
    announcer: Announcer | None = None
    loop: StepLoop | None = None
    service: SessionService | None = None
    pool: PushPool | None = None
    throughput: float = 0.0
    state: ServerState = "joining"
    _status_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _status_dirty: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _stopped: bool = False

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
                "num_blocks": self.card.num_blocks, "dtype": self.config.dtype,
                "throughput": round(self.throughput, 2), "cache_tokens": self.config.cache_tokens,
                "torch_threads": _torch_threads(), "state": self.state}

    def record(self) -> ServerRecord:
        left = self.service.budget.tokens_left if self.service is not None else self.config.cache_tokens
        return ServerRecord(
            peer_id=self.peer_id, model_id=self.model_id, span=self.span_range, state=self.state,
            throughput=self.throughput, cache_tokens_left=left, addresses=self.maddrs[:16],
            direct_addresses=self.node.direct_addresses[:8],
            software_version=__version__, public_name=self.config.public_name, protocol_version=PROTOCOL_VERSION,
        )

    # ---- start -------------------------------------------------------------------------------

    @classmethod
    async def start(cls, config: ServerConfig, p2p: P2PConfig, model_dir: str | Path | None = None) -> BlockServer:
        """Check, join the swarm, load, measure, serve and announce; see the module docstring."""
        model_dir = Path(model_dir or config.model).expanduser()
        span_range = config.span
        if config.torch_threads is not None:
            import torch

            torch.set_num_threads(config.torch_threads)  # process-wide: the step loop's worker thread uses it
            log.info("torch uses %d compute threads", torch.get_num_threads())
        ckpt = await asyncio.to_thread(Checkpoint, model_dir)
        spec = ckpt.spec
        if span_range.end > spec.num_blocks:
            raise ConfigError(f"--blocks {span_range} lies outside the model: {model_dir.name} has "
                              f"{spec.num_blocks} blocks (valid: 0:{spec.num_blocks} or any part of it)")
        expected: dict[str, tuple[int, ...]] = {}
        for i in span_range.blocks():
            expected.update(spec.block_tensors(i))
        ckpt.check(expected, f"blocks {span_range}")
        model_id = await asyncio.to_thread(checkpoint_fingerprint, model_dir)
        card = ModelCard(model_id=model_id, name=(config.model_name or model_dir.resolve().name)[:256],
                         family=spec.family, num_blocks=spec.num_blocks, hidden_size=spec.hidden_size,
                         dtype=_card_dtype(spec.torch_dtype, config.dtype))
        read_timeout = max(3600.0, 2 * config.session_idle_timeout)  # idle sessions are expired by the service
        settings = NodeSettings(stream=StreamSettings(read_timeout=read_timeout, limits=DEFAULT_LIMITS))
        node = await PeerNode.start(p2p, settings)
        server = cls(config, model_dir, span_range, model_id, card, node)
        try:
            await server._serve(ckpt)
        except BaseException:
            await server.stop()
            raise
        return server

    async def _serve(self, ckpt: Checkpoint) -> None:
        cfg = self.config
        log.info("peer %s joined the swarm at %s", self.peer_id, ", ".join(self.maddrs))
        self.announcer = Announcer(self.node, self.card, self.record(), ttl=cfg.announce_ttl,
                                   refresh=cfg.announce_refresh)
        await self.announcer.start()
        log.info("announced model %s (%s) blocks %s as joining", self.card.name, self.model_id, self.span_range)
        t0 = time.perf_counter()
        span = await asyncio.to_thread(ckpt.load_span, self.span_range, cfg.dtype)
        log.info("loaded blocks %s (%s) in %.2f s", self.span_range, cfg.dtype, time.perf_counter() - t0)
        self.loop = StepLoop(span, lambda job, out, err: self._on_result(job, out, err), limits=DEFAULT_LIMITS)
        self.throughput = await self.loop.call(measure_throughput, span)
        log.info("measured %.1f decode tokens/s for blocks %s", self.throughput, self.span_range)
        self.service = SessionService(
            model_id=self.model_id, peer_id=self.peer_id, loop=self.loop,
            budget=MemoryBudget(cfg.cache_tokens, cfg.max_sessions), limits=DEFAULT_LIMITS,
            max_step_tokens=cfg.max_step_tokens, idle_timeout=cfg.session_idle_timeout,
            on_change=self._status_dirty.set,
        )
        self.pool = PushPool(self.node, self.service.on_push_error, settings=self.node.settings.stream)
        self.service.pool = self.pool
        self.loop.start()
        self.service.start()
        await self.node.handle(SESSION_PROTOCOL, self.service.handle_session)
        await self.node.handle(PUSH_PROTOCOL, self.service.handle_push)
        self.state = "online"
        await self._publish_now()
        self._status_task = asyncio.create_task(self._announce_status(), name="announce-status")
        log.info("online: serving blocks %s of %s to sessions (%d tokens of KV cache, at most %d sessions)",
                 self.span_range, self.card.name, cfg.cache_tokens, cfg.max_sessions)

    async def _publish_now(self) -> None:
        """Publish the current record at once (not through the refresh task: no racing duplicate)."""
        assert self.announcer is not None
        self.announcer.record = self.record()
        await self.announcer.publish()

    def _on_result(self, job: Any, out: Any, err: Any) -> None:
        assert self.service is not None
        self.service.on_result(job, out, err)

    async def _announce_status(self) -> None:
        """Re-announce ``cache_tokens_left`` after sessions come and go (at most every debounce)."""
        assert self.announcer is not None
        while True:
            await self._status_dirty.wait()
            await asyncio.sleep(STATUS_DEBOUNCE)
            self._status_dirty.clear()
            if self.state == "online":
                self.announcer.update(self.record())

    # ---- stop --------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Drain and leave: announce draining, end sessions, stop serving (idempotent, never raises)."""
        if self._stopped:
            return
        self._stopped = True
        log.info("stopping: draining blocks %s", self.span_range)
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._status_task
        if self.announcer is not None:
            await self.announcer.stop()
            if self.state == "online":
                self.state = "draining"
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(3.0):
                        await self._publish_now()
        for step in (self.service.shutdown if self.service else None,
                     self.loop.stop if self.loop else None,
                     self.pool.close if self.pool else None,
                     self.node.close):
            if step is None:
                continue
            try:
                await step()
            except Exception:
                log.warning("error while stopping", exc_info=True)
        log.info("stopped")


def _watch_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when stdin reaches EOF. Reads the raw fd (never ``sys.stdin``'s buffered reader,
    whose lock a blocked daemon thread would hold at interpreter exit, aborting it)."""
    fd = sys.stdin.fileno()

    def on_readable() -> None:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            stop.set()

    try:
        loop.add_reader(fd, on_readable)
    except (OSError, ValueError, PermissionError):  # e.g. a regular file: epoll cannot watch it
        def drain() -> None:
            with contextlib.suppress(OSError):
                while os.read(fd, 65536):
                    pass
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=drain, name="stdin-watch", daemon=True).start()


async def serve_until_signal(config: ServerConfig, p2p: P2PConfig, *, model_dir: str | Path | None = None,
                             on_ready: Callable[[BlockServer], None] = lambda s: None,
                             stop_on_stdin_eof: bool = False) -> int:
    """Run a server until SIGTERM/SIGINT (or stdin EOF when asked); returns the exit code (0)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if stop_on_stdin_eof:
        _watch_stdin_eof(loop, stop)
    starting = asyncio.create_task(BlockServer.start(config, p2p, model_dir))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # signalled during start-up: BlockServer.start cleans up on cancel
        log.info("stop requested during start-up")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, MeshinferError):
            await starting
        return 0
    stopping.cancel()
    server = starting.result()  # raises the start-up error, if any
    try:
        on_ready(server)
        await stop.wait()
    finally:
        await server.stop()
    return 0
