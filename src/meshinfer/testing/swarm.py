"""``LocalSwarm``: a real swarm on 127.0.0.1: a ``meshinfer dht`` bootstrap and ``meshinfer serve`` processes.

Contract: ``LocalSwarm(model_dir, spans=[(0, 2), (2, 4)])`` starts (on ``start()`` or ``with``) one
bootstrap peer (unless ``initial_peers`` of an existing swarm are given, then it joins those) and one
server process per span, all at once (each with ``--torch-threads 1`` by default when there are
several, so they do not oversubscribe the cores), and waits for each server's "ready" line (printed once it is
announced in the DHT), collecting the multiaddrs it printed. It exposes ``initial_peers`` (what
clients pass to join), ``servers`` (``ServerProcess``: pid, peer id, span, multiaddrs) and
``model_id``. ``stop()`` stops every process it started, by PID only (SIGTERM, then SIGKILL), servers
first; it is idempotent and also runs when start-up fails half way. ``add_server``/``stop_server``
change the swarm while it runs (for failover tests and demos). ``auto_servers=N`` (or
``add_server(None)``) adds servers started without ``--blocks``, which place themselves; their
``span`` is where they started (from the ready line) and may change later. ``dishonest=`` (a
``testing.dishonest.DishonestConfig``, per ``add_server`` call or per index of ``spans`` at construction)
starts that server through ``python -m meshinfer.testing.dishonest`` instead: the same ``serve`` arguments,
its compute lying (for tests of audits). Used by tests, the demo and benchmarks; knows nothing of what clients
do with the swarm.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshinfer.errors import ConfigError, UsageError
from meshinfer.readyline import READY_PREFIX, parse_ready_line
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, python_argv, start_dht
from meshinfer.types import BlockRange

if TYPE_CHECKING:  # the config only: this module stays free of torch
    from meshinfer.testing.dishonest import DishonestConfig


@dataclass
class ServerProcess:
    """One ``meshinfer serve`` child of a ``LocalSwarm``."""

    proc: ManagedProcess
    span: BlockRange | None
    """The span it was started with; for a self-placing server, where it started (None until ready)."""
    maddrs: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    """What the server's ready line said (peer_id, maddrs, model_id, blocks, throughput...)."""
    auto: bool = False
    """Started without ``--blocks``: it chose its span and may move (rebalancing)."""
    dishonest: DishonestConfig | None = None
    """How this server lies (started through ``meshinfer.testing.dishonest``); None: an honest server."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def peer_id(self) -> str:
        """The server's peer id (from its ready line, else the ``/p2p/<id>`` part of its multiaddrs)."""
        if isinstance(self.info.get("peer_id"), str):
            return self.info["peer_id"]
        for maddr in self.maddrs:
            parts = maddr.split("/")
            if "p2p" in parts and parts.index("p2p") + 1 < len(parts):
                return parts[parts.index("p2p") + 1]
        raise ConfigError(f"server pid {self.pid} printed no /p2p/ multiaddr (got {self.maddrs})")

    def alive(self) -> bool:
        return self.proc.alive()


def _as_range(span: BlockRange | tuple[int, int] | str) -> BlockRange:
    if isinstance(span, BlockRange):
        return span
    if isinstance(span, str):
        return BlockRange.parse(span)
    return BlockRange(int(span[0]), int(span[1]))


class LocalSwarm:
    """A bootstrap peer plus block servers of one model, as real processes on 127.0.0.1."""

    def __init__(
        self,
        model_dir: str | Path,
        spans: Sequence[BlockRange | tuple[int, int] | str] | None = ((0, 2), (2, 4)),
        *,
        auto_servers: int = 0,
        initial_peers: Sequence[str] = (),
        dtype: str = "fp32",
        server_args: Sequence[str] = (),
        startup_timeout: float = 120.0,
        torch_threads: int | str | None = "auto",
        dishonest: dict[int, DishonestConfig] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.spans = [_as_range(s) for s in spans or ()]
        if auto_servers < 0:
            raise ConfigError(f"auto_servers must be >= 0, got {auto_servers}")
        self.auto_servers = auto_servers
        """How many servers ``start`` launches without ``--blocks`` (after those of ``spans``)."""
        self.dtype = dtype
        self.server_args = list(server_args)
        self.dishonest: dict[int, DishonestConfig] = dict(dishonest or {})
        """Index in ``spans`` -> how that server lies (started through ``meshinfer.testing.dishonest``)."""
        if any(not 0 <= i < len(self.spans) for i in self.dishonest):
            raise ConfigError(f"dishonest= keys must index spans (0..{len(self.spans) - 1}), "
                              f"got {sorted(self.dishonest)}")
        if torch_threads == "auto":  # several servers on one machine: one compute thread each
            torch_threads = 1 if len(self.spans) + auto_servers > 1 else None
        if torch_threads is not None and not isinstance(torch_threads, int):
            raise ConfigError(f"torch_threads must be an int, None or 'auto', got {torch_threads!r}")
        self.torch_threads: int | None = torch_threads
        """``--torch-threads`` passed to every server (None: torch's default; server_args may override)."""
        self.startup_timeout = startup_timeout
        self.dht: ManagedProcess | None = None
        self.initial_peers: list[str] = list(initial_peers)
        self._own_bootstrap = not initial_peers
        self.servers: list[ServerProcess] = []
        self._model_id: str | None = None

    @property
    def model_id(self) -> str:
        """The id servers announce: the checkpoint's fingerprint."""
        if self._model_id is None:
            from meshinfer.models.fingerprint import checkpoint_fingerprint

            self._model_id = checkpoint_fingerprint(self.model_dir)
        return self._model_id

    # ---- starting ------------------------------------------------------------------------------

    def start(self) -> LocalSwarm:
        """Start the bootstrap (if own) and every server in parallel; wait until all are ready."""
        try:
            if self._own_bootstrap and self.dht is None:
                self.dht, self.initial_peers = start_dht(timeout=self.startup_timeout)
                if not self.initial_peers:
                    raise RuntimeError("the bootstrap peer printed no multiaddrs")
            spans = [*self.spans, *[None] * self.auto_servers]
            self._start_servers(spans, liars=[self.dishonest.get(i) for i in range(len(spans))])
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, span: BlockRange | None, extra_args: Sequence[str] = (),
                dishonest: DishonestConfig | None = None) -> ServerProcess:
        blocks = [] if span is None else ["--blocks", str(span)]
        serve = ["serve", "--model", str(self.model_dir), *blocks, "--dtype", self.dtype, "--host", "127.0.0.1",
                 "--stop-on-stdin-eof", *self._thread_args(), "--initial-peers", *self.initial_peers,
                 *self.server_args, *extra_args]
        if dishonest is None:
            argv = meshinfer_argv(*serve)
        else:
            argv = python_argv("meshinfer.testing.dishonest", *dishonest.flags(), "--", *serve)
        name = f"meshinfer serve {span if span is not None else '(auto)'}"
        if dishonest is not None:
            name += f" (dishonest: {dishonest.mode})"
        server = ServerProcess(ManagedProcess(argv, name=name), span, auto=span is None, dishonest=dishonest)
        self.servers.append(server)
        return server

    def _thread_args(self) -> list[str]:
        return [] if self.torch_threads is None else ["--torch-threads", str(self.torch_threads)]

    def _wait_ready(self, server: ServerProcess, deadline: float) -> None:
        """Read the server's stdout up to its ``ready {json}`` line (multiaddrs come one per line first)."""
        while True:
            line = server.proc.read_line(max(0.1, deadline - time.monotonic()))
            if line.startswith("/"):
                server.maddrs.append(line.strip())
            elif line.startswith(READY_PREFIX):  # multiaddrs, then ``ready {json}``, once it is announced
                server.info = parse_ready_line(line) or {}
                if not server.maddrs and isinstance(server.info.get("maddrs"), list):
                    server.maddrs = [str(m) for m in server.info["maddrs"]]
                if server.span is None and isinstance(server.info.get("blocks"), str):
                    server.span = BlockRange.parse(server.info["blocks"])
                return

    def _start_servers(self, spans: Sequence[BlockRange | None], extra_args: Sequence[str] = (),
                       liars: Sequence[DishonestConfig | None] = ()) -> list[ServerProcess]:
        liars = [*liars, *[None] * (len(spans) - len(liars))]
        launched = [self._launch(span, extra_args, liar) for span, liar in zip(spans, liars, strict=True)]
        deadline = time.monotonic() + self.startup_timeout
        for server in launched:
            self._wait_ready(server, deadline)
        return launched

    def add_server(self, span: BlockRange | tuple[int, int] | str | None = None, *,
                   extra_args: Sequence[str] = (), dishonest: DishonestConfig | None = None) -> ServerProcess:
        """Start one more server (after ``start``; ``span`` None: it places itself) with ``extra_args``
        after the swarm's ``server_args``, and wait until it is ready; with ``dishonest``, a lying one."""
        if not self.initial_peers:
            raise UsageError("start the swarm before adding servers")
        try:
            return self._start_servers([None if span is None else _as_range(span)], extra_args, [dishonest])[0]
        except BaseException:
            self.servers[-1].proc.stop()
            raise

    # ---- stopping ------------------------------------------------------------------------------

    def stop_server(self, server: ServerProcess, *, graceful: bool = True) -> int | None:
        """Stop one server (SIGTERM, or SIGKILL with ``graceful=False``); returns its exit code."""
        if not graceful:
            server.proc.kill()
        return server.proc.stop(timeout=10.0)

    def stop(self) -> None:
        """Stop every process this swarm started, by PID: servers first, then the bootstrap."""
        try:
            for server in self.servers:
                server.proc.kill(signal.SIGTERM)  # SIGTERM all first so they shut down in parallel
            for server in self.servers:
                server.proc.stop(timeout=10.0)
        finally:  # even when interrupted (Ctrl-C) while waiting: the bootstrap does not stop by itself
            if self.dht is not None:
                self.dht.stop(timeout=10.0)

    @property
    def pids(self) -> list[int]:
        """PIDs of every process started by this swarm (bootstrap included)."""
        return ([self.dht.pid] if self.dht is not None else []) + [s.pid for s in self.servers]

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
