"""A userspace WAN emulator: TCP relays on 127.0.0.1 that delay and rate-limit what passes through them.

Contract: ``Relay`` (asyncio, one event loop) listens on 127.0.0.1 ports, one per ``listen(target)``, and
forwards each accepted connection to ``target`` (a ``host:port`` on this machine). Each listener is one
emulated access link of the peer behind it, with a ``LinkSchedule`` per direction shared by all connections
through it (``bench.wan_link``: token-bucket bandwidth cap, then a fixed one-way delay; every chunk is
delivered at the time the schedule gives, in arrival order, by one timer per direction, never one sleep per
chunk). A connection's upstream leg is dialled one delay after the accept (the SYN's trip) and the dialler's
first bytes arrive no sooner than three delays after it (the handshake's round trip, then the data). A peer
announcing the relay's port (``--announce`` / ``--direct-announce``) is reached only through it, so one
relay per peer puts exactly one emulated link between any two processes. Every socket the relay owns has
``TCP_NODELAY`` (asyncio sets it on TCP transports; checked at accept). Unread data is bounded
(``max_queue_bytes`` per direction): past it the relay stops reading, so the sender's TCP blocks.

How close to a real link: delays and the cap are exact up to the relay's wake-up (it arms its timer 2 ms early
and sleeps the rest, so lateness is the scheduler's, measured and reported by ``stats``). No loss, jitter or
reordering. Both TCP legs run over loopback, so the endpoints' TCP sees a microsecond RTT: no slow start
and no window limit across the emulated delay (a real fresh 50 ms link needs several round trips to reach a
large transfer's full rate; here it has the capped rate at once), and the kernel accepts the connection at
once (``connect()`` returns before the emulated handshake ended; the data still waits for it). Small
messages (one token's hidden state fits TCP's initial window) behave as on a real link; large first
transfers are optimistic.

``python -m meshinfer.bench.wan_relay`` runs a ``Relay`` driven by JSON lines on stdin (``listen``, ``set``,
``stats``) and exits when stdin closes (its parent vanished) or on SIGINT/SIGTERM: nothing outlives it.
``RelayProcess`` starts and stops that child (by PID) for benchmarks. Knows nothing of meshinfer's protocols.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from meshinfer.bench.wan_link import LinkSchedule
from meshinfer.errors import ConfigError

EARLY_S = 0.002
"""The delivery timer fires this early; the rest is slept (epoll rounds timeouts up to whole ms)."""
CHUNK = 256 * 1024
MAX_QUEUE_BYTES = 8 * 1024 * 1024


@dataclass
class Stats:
    """What a relay delivered and how late (seconds past the schedule's time) it did so."""

    chunks: int = 0
    bytes: int = 0
    late_s_sum: float = 0.0
    late_s_max: float = 0.0

    def add(self, nbytes: int, late_s: float) -> None:
        self.chunks += 1
        self.bytes += nbytes
        self.late_s_sum += late_s
        self.late_s_max = max(self.late_s_max, late_s)

    def as_dict(self) -> dict[str, float | int]:
        return {"chunks": self.chunks, "bytes": self.bytes,
                "late_ms_mean": 1000 * self.late_s_sum / self.chunks if self.chunks else 0.0,
                "late_ms_max": 1000 * self.late_s_max}


@dataclass
class _Link:
    target: tuple[str, int]
    inbound: LinkSchedule = field(default_factory=LinkSchedule)
    """Dialler -> peer behind the relay."""
    outbound: LinkSchedule = field(default_factory=LinkSchedule)
    server: asyncio.Server | None = None


class _Pipe:
    """One direction of one relayed connection: reads, stamps each chunk with its delivery time, writes on time."""

    def __init__(self, relay: Relay, schedule: LinkSchedule, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, floor: float) -> None:
        self.relay, self.schedule, self.reader, self.writer, self.floor = relay, schedule, reader, writer, floor
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # (deliver at, data; b"": EOF)
        self.queued = 0
        self.room = asyncio.Event()
        self.room.set()
        self.timer: asyncio.TimerHandle | None = None
        self.done = asyncio.get_running_loop().create_future()

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(CHUNK)
                now = loop.time()
                when = max(self.schedule.deliver_at(now, len(data)), self.floor)
                self.queue.append((when, data))
                self.queued += len(data)
                if self.queued > self.relay.max_queue_bytes:
                    self.room.clear()
                self._arm()
                if not data:
                    break
            await self.done
        except (ConnectionError, OSError):
            self.writer.close()

    def _arm(self) -> None:
        if self.timer is None and self.queue:
            self.timer = asyncio.get_running_loop().call_at(self.queue[0][0] - EARLY_S, self._flush)

    def _flush(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        while self.queue and self.queue[0][0] <= loop.time() + EARLY_S:
            when, data = self.queue.popleft()
            wait = when - loop.time()
            if wait > 0:
                time.sleep(wait)
            self.relay.stats.add(len(data), max(0.0, loop.time() - when))
            self.queued -= len(data)
            if self.queued <= self.relay.max_queue_bytes:
                self.room.set()
            try:
                if data:
                    self.writer.write(data)
                elif self.writer.can_write_eof():
                    self.writer.write_eof()
                else:
                    self.writer.close()
            except (ConnectionError, OSError, RuntimeError):
                pass
            if not data and not self.done.done():
                self.done.set_result(None)
        self._arm()


class Relay:
    """Delay/bandwidth relays in one asyncio loop (see the module doc). Create and use it inside that loop."""

    def __init__(self, *, delay_s: float = 0.0, rate_bytes_s: float = 0.0,
                 max_queue_bytes: int = MAX_QUEUE_BYTES) -> None:
        self.delay_s, self.rate_bytes_s = 0.0, 0.0
        self.max_queue_bytes = max_queue_bytes
        self.links: list[_Link] = []
        self.stats = Stats()
        self.nodelay_ok = True
        """False once an accepted or dialled socket was found without TCP_NODELAY."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self.configure(delay_s, rate_bytes_s)

    def configure(self, delay_s: float, rate_bytes_s: float) -> None:
        """Set every link's one-way delay (s) and cap (bytes/s, 0: none), both directions (from now on)."""
        if not delay_s >= 0 or not rate_bytes_s >= 0:
            raise ConfigError(f"need delay >= 0 and rate >= 0, got {delay_s} s and {rate_bytes_s} bytes/s")
        self.delay_s, self.rate_bytes_s = delay_s, rate_bytes_s
        for link in self.links:
            link.inbound.configure(delay_s, rate_bytes_s)
            link.outbound.configure(delay_s, rate_bytes_s)

    async def listen(self, target_host: str, target_port: int) -> int:
        """A new link in front of ``target`` (a loopback address: the emulator never touches another machine):
        returns the 127.0.0.1 port to dial instead."""
        try:
            loopback = ipaddress.ip_address(target_host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"the WAN relay forwards only to this machine's loopback, not {target_host!r}")
        link = _Link((target_host, target_port), LinkSchedule(self.delay_s, self.rate_bytes_s),
                     LinkSchedule(self.delay_s, self.rate_bytes_s))
        link.server = await asyncio.start_server(lambda r, w: self._accept(link, r, w), "127.0.0.1", 0)
        self.links.append(link)
        return int(link.server.sockets[0].getsockname()[1])

    def _check_nodelay(self, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
            self.nodelay_ok = False

    async def _accept(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        up_writer: asyncio.StreamWriter | None = None
        try:
            self._check_nodelay(writer)
            await asyncio.sleep(link.inbound.delay_s)  # the SYN's trip to the peer
            up_reader, up_writer = await asyncio.open_connection(*link.target)
            self._check_nodelay(up_writer)
            inbound = _Pipe(self, link.inbound, reader, up_writer, link.inbound.handshake_floor(accepted))
            outbound = _Pipe(self, link.outbound, up_reader, writer, 0.0)
            await asyncio.gather(inbound.pump(), outbound.pump())
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        """Stop listening and end every relayed connection."""
        for link in self.links:
            if link.server is not None:
                link.server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self.links.clear()


# ---- the child process and its handle -------------------------------------------------------------


async def _handle(relay: Relay, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd.get("op")
    if op == "listen":
        host, _, port = str(cmd["target"]).rpartition(":")
        return {"ok": True, "port": await relay.listen(host, int(port))}
    if op == "set":
        relay.configure(float(cmd.get("delay_ms", 0)) / 1000, float(cmd.get("rate_bytes_s", 0)))
        return {"ok": True}
    if op == "stats":
        out: dict[str, Any] = {"ok": True, "nodelay": relay.nodelay_ok, **relay.stats.as_dict()}
        if cmd.get("reset"):
            relay.stats = Stats()
        return out
    return {"ok": False, "error": f"unknown op {op!r}"}


async def _serve_stdin() -> None:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:  # a thread: stdin is a pipe asyncio cannot always watch
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, daemon=True).start()
    relay = Relay()
    print(json.dumps({"ready": True}), flush=True)
    try:
        while (line := await lines.get()) is not None:
            try:
                reply = await _handle(relay, json.loads(line))
            except (ValueError, KeyError, ConfigError, OSError) as e:
                reply = {"ok": False, "error": str(e)}
            print(json.dumps(reply), flush=True)
    finally:
        await relay.close()


NICE = -10
"""The relay process's priority (when allowed): the emulated network must not queue behind the compute it
links (a real network does not share the peers' cores); its lateness is measured either way."""


def main() -> None:
    import os

    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    try:
        asyncio.run(_serve_stdin())
    except KeyboardInterrupt:
        pass


class RelayProcess:
    """The relay child of a benchmark: ``listen``/``configure``/``stats`` over its stdin; ``stop`` by PID."""

    def __init__(self) -> None:
        from meshinfer.testing.procs import ManagedProcess, python_argv

        self.proc = ManagedProcess(python_argv("meshinfer.bench.wan_relay"), name="meshinfer wan relay")
        try:
            self.proc.read_json(30.0)
        except BaseException:
            self.proc.stop()
            raise

    def _ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        reply = self.proc.request(cmd, timeout=30.0)
        if not reply.get("ok"):
            raise RuntimeError(f"wan relay refused {cmd}: {reply.get('error')}")
        return reply

    def listen(self, target_port: int, target_host: str = "127.0.0.1") -> int:
        return int(self._ask({"op": "listen", "target": f"{target_host}:{target_port}"})["port"])

    def configure(self, delay_ms: float, rate_bytes_s: float) -> None:
        self._ask({"op": "set", "delay_ms": delay_ms, "rate_bytes_s": rate_bytes_s})

    def stats(self, reset: bool = False) -> dict[str, Any]:
        out = self._ask({"op": "stats", "reset": reset})
        out.pop("ok", None)
        return out

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int | None:
        return self.proc.stop(timeout=10.0)

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for a server's fixed ``--port`` / ``--direct-port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
