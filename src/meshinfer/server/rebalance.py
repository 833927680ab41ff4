"""Automatic placement around ``placement``: how long a span, where to start, and when to move.

Contract: the policy of a server started without ``--blocks`` (architecture.md section 6), kept free
of torch and of the network so that it is tested in milliseconds. The swarm is read through an
injected coroutine (``SnapshotReader``: returns a ``Snapshot`` of ``ServerRecord``s) and a move is
carried out through an injected coroutine (``Rebalancer.move``); sleeping and randomness are injected
too. The server (``server.app``) wires them to the DHT and to its own drain/load/announce steps.

* ``auto_span_length``: ``--num-blocks`` if given (clamped to the model), else as many blocks as the
  available memory holds (``/proc/meminfo`` ``MemAvailable`` less ``MEMORY_HEADROOM``; each block
  costs its weights plus its share of the KV budget), else, when memory cannot be read, the whole model.
* ``choose_start_span``: waits a random 0..``START_JITTER_S`` s (so servers started together do not read
  the same snapshot), reads the swarm, chooses with ``placement.choose_span`` (peer id as tie-break),
  waits a little again and re-reads once just before the caller announces the span as ``joining``.
* ``Rebalancer``: every ``interval`` s (jittered by ``REBALANCE_JITTER``) an ``online`` server asks
  ``placement.should_move``; a proposed move is confirmed on a fresh snapshot before ``move`` runs.
  Incomplete snapshots are never acted on. Every decision is logged with its reason.
It never knows how records are read or published, nor how a span is loaded or served.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from meshinfer.errors import ConfigError
from meshinfer.server.placement import (
    COUNTED_STATES,
    DEFAULT_BALANCE_QUALITY,
    block_throughputs,
    choose_span,
    should_move,
    span_length_for_memory,
)
from meshinfer.types import BlockRange, PeerIdStr
from meshinfer.wire.records import ServerRecord

log = logging.getLogger(__name__)

START_JITTER_S = 1.0
"""Most seconds a new server waits before reading the swarm (random, so simultaneous starts spread out)."""
RECHECK_JITTER_S = 0.25
"""Most seconds between the first read and the re-read just before announcing."""
REBALANCE_JITTER = 0.2
"""Rebalance checks come every interval times a random factor in [1 - this, 1 + this]."""
MEMORY_HEADROOM = 0.2
"""Fraction of the available memory left for torch, activations and everything else on the machine."""

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Snapshot:
    """The swarm's servers of one model as read at one moment; ``complete`` is False when some keys went
    unanswered (then an apparent hole may be a read failure, so nobody moves on it)."""

    servers: list[ServerRecord]
    complete: bool = True


SnapshotReader = Callable[[], Awaitable[Snapshot]]


# ---- pure helpers ----------------------------------------------------------------------------


def parse_mem_available(meminfo: str) -> int | None:
    """Bytes of ``MemAvailable`` in the text of ``/proc/meminfo`` (None when absent or malformed)."""
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() != "MemAvailable":
            continue
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            return None
        unit = parts[1].lower() if len(parts) > 1 else "b"
        scale = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}.get(unit)
        return None if scale is None else int(parts[0]) * scale
    return None


def available_memory(path: str | Path = "/proc/meminfo") -> int | None:
    """This machine's available memory in bytes, or None when it cannot be read (not Linux...)."""
    try:
        return parse_mem_available(Path(path).read_text())
    except OSError:
        return None


def auto_span_length(num_blocks: int, *, requested: int | None, free_bytes: int | None, weight_bytes: int,
                     kv_bytes: int, headroom: float = MEMORY_HEADROOM) -> tuple[int, str]:
    """(span length, why) for a server placing itself on a model of ``num_blocks`` blocks.

    ``requested`` is ``--num-blocks`` (clamped to [1, num_blocks]). Otherwise ``free_bytes`` less
    ``headroom`` must hold, per block, ``weight_bytes`` of weights and ``kv_bytes`` of KV cache (the
    block's share of the session budget); ``free_bytes`` None means unknown: the whole model.
    ConfigError when not even one block fits.
    """
    if num_blocks < 1:
        raise ConfigError(f"a model needs at least one block, got num_blocks={num_blocks}")
    if requested is not None:
        length = min(max(requested, 1), num_blocks)
        clamp = f" (the model has only {num_blocks})" if requested > num_blocks else ""
        return length, f"--num-blocks {requested}{clamp}"
    if free_bytes is None:
        return num_blocks, "available memory unknown: the whole model"
    if weight_bytes <= 0 or kv_bytes < 0:
        raise ConfigError(f"block sizes must be > 0 bytes of weights and >= 0 of KV, got {weight_bytes}, {kv_bytes}")
    if not 0 <= headroom < 1:
        raise ConfigError(f"memory headroom must be in [0, 1), got {headroom}")
    usable = math.floor(max(free_bytes, 0) * (1.0 - headroom))
    try:
        length = span_length_for_memory(usable, weight_bytes, num_blocks,
                                        cache_fraction=kv_bytes / (weight_bytes + kv_bytes))
    except ConfigError as err:
        raise ConfigError(f"cannot place this server automatically: {err}; free memory, lower --cache-tokens "
                          f"or give --num-blocks") from None
    per_block = (weight_bytes + kv_bytes) / 2**20
    return length, (f"{length} of {num_blocks} blocks fit in {usable / 2**20:.0f} MiB "
                    f"({1 - headroom:.0%} of the available memory) at {per_block:.1f} MiB per block with its KV cache")


def jittered(interval: float, rng: random.Random, spread: float = REBALANCE_JITTER) -> float:
    """``interval`` times a uniform random factor in [1 - spread, 1 + spread]."""
    if interval < 0 or not 0 <= spread < 1:
        raise ConfigError(f"need interval >= 0 and 0 <= spread < 1, got {interval}, {spread}")
    return interval * rng.uniform(1.0 - spread, 1.0 + spread)


def throughput_estimate(servers: Iterable[ServerRecord]) -> float:
    """A new server's guess of its own throughput before measuring: the median of the measured ones
    (servers of one model on similar machines), 0.0 when none has measured yet."""
    measured = [s.throughput for s in servers if s.state in COUNTED_STATES and s.throughput > 0]
    return float(statistics.median(measured)) if measured else 0.0


def with_own_record(servers: Iterable[ServerRecord], own: ServerRecord) -> list[ServerRecord]:
    """``servers`` with every record of ``own.peer_id`` replaced by ``own`` (the DHT may lag behind)."""
    return [own, *(s for s in servers if s.peer_id != own.peer_id)]


def swarm_minimum(servers: Iterable[ServerRecord], num_blocks: int, *, exclude: Iterable[PeerIdStr] = (),
                  extra: tuple[BlockRange, float] | None = None) -> float:
    """The slowest block's throughput (0.0: a hole), optionally without ``exclude`` and with one more
    server ``extra`` = (span, throughput)."""
    totals = block_throughputs(servers, num_blocks, exclude=exclude)
    if extra is not None:
        span, rate = extra
        for block in range(span.start, min(span.end, num_blocks)):
            totals[block] += rate
    return min(totals)


# ---- start-up placement ----------------------------------------------------------------------


async def choose_start_span(read: SnapshotReader, *, num_blocks: int, length: int, peer_id: PeerIdStr,
                            rng: random.Random, sleep: Sleep = asyncio.sleep,
                            start_jitter: float = START_JITTER_S,
                            recheck_jitter: float = RECHECK_JITTER_S) -> tuple[BlockRange, str]:
    """(span, why) for a server about to announce itself: read, choose, re-read, choose again.

    A stale record of ``peer_id`` itself (a restart with the same identity) is ignored.
    """
    await sleep(rng.uniform(0.0, start_jitter))
    snapshot = await read()
    first = _choose(snapshot, num_blocks, length, peer_id)
    await sleep(rng.uniform(0.0, recheck_jitter))
    snapshot = await read()
    span = _choose(snapshot, num_blocks, length, peer_id)
    others = [s for s in snapshot.servers if s.peer_id != peer_id and s.state in COUNTED_STATES]
    holes = [i for i, t in enumerate(block_throughputs(others, num_blocks)) if t == 0.0]
    where = (f"fills a hole ({len(holes)} uncovered blocks)" if holes and any(i in span for i in holes)
             else "weakest blocks")
    why = (f"{where} among {len(others)} other servers" + ("" if snapshot.complete else " (incomplete read)")
           + ("" if first == span else f"; the re-read changed the choice from {first}"))
    return span, why


def _choose(snapshot: Snapshot, num_blocks: int, length: int, peer_id: PeerIdStr) -> BlockRange:
    others = [s for s in snapshot.servers if s.peer_id != peer_id]
    return choose_span(others, num_blocks, length, own_throughput=throughput_estimate(others), tie_break=peer_id)


# ---- rebalancing -----------------------------------------------------------------------------


class Rebalancer:
    """Periodic ``should_move`` checks of one automatically placed server; calls ``move`` when confirmed."""

    def __init__(self, *, read: SnapshotReader, move: Callable[[BlockRange], Awaitable[None]],
                 me: Callable[[], ServerRecord], num_blocks: int, interval: float,
                 balance_quality: float = DEFAULT_BALANCE_QUALITY, rng: random.Random | None = None,
                 sleep: Sleep = asyncio.sleep) -> None:
        if not interval > 0:
            raise ConfigError(f"a rebalancer needs an interval > 0 s, got {interval}")
        self.read, self.move, self.me = read, move, me
        self.num_blocks = num_blocks
        self.interval = interval
        self.balance_quality = balance_quality
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.moves = 0

    def _proposal(self, snapshot: Snapshot, own: ServerRecord) -> BlockRange | None:
        return should_move(with_own_record(snapshot.servers, own), self.num_blocks, me=own.peer_id,
                           balance_quality=self.balance_quality)

    async def check(self) -> BlockRange | None:
        """One check: the span to move to (confirmed on a second, fresh snapshot), or None to stay."""
        own = self.me()
        if own.state != "online":
            log.info("rebalance: not checking while %s", own.state)
            return None
        snapshot = await self.read()
        if not snapshot.complete:
            log.info("rebalance: staying at %s: the swarm could not be read completely", own.span)
            return None
        servers = with_own_record(snapshot.servers, own)
        now = swarm_minimum(servers, self.num_blocks)
        target = self._proposal(snapshot, own)
        if target is None:
            log.info("rebalance: staying at %s (slowest block %.1f tokens/s, %d servers)", own.span, now,
                     len(servers))
            return None
        after = swarm_minimum(servers, self.num_blocks, exclude=[own.peer_id], extra=(target, own.throughput))
        log.info("rebalance: moving %s -> %s would raise the slowest block from %.1f to %.1f tokens/s; "
                 "confirming on a fresh snapshot", own.span, target, now, after)
        fresh = await self.read()
        own = self.me()
        confirmed = self._proposal(fresh, own) if fresh.complete and own.state == "online" else None
        if confirmed is None:
            log.info("rebalance: staying at %s: the fresh snapshot no longer calls for a move", own.span)
            return None
        if confirmed != target:
            log.info("rebalance: the fresh snapshot points to %s instead of %s", confirmed, target)
        return confirmed

    async def run(self) -> None:
        """Check every jittered ``interval`` until cancelled; move when a check says so."""
        while True:
            await self.sleep(jittered(self.interval, self.rng))
            try:
                target = await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a failed read must not end rebalancing
                log.warning("rebalance check failed: %s", err)
                continue
            if target is None:
                continue
            self.moves += 1
            try:
                await self.move(target)
            except asyncio.CancelledError:
                raise
            except Exception:  # the mover cleans up after itself; keep checking
                log.exception("rebalance: moving to %s failed", target)
