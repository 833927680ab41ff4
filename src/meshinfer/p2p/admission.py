"""Admission of incoming streams: how many a peer may hold, and how many bytes their messages may buffer.

Contract: pure bookkeeping shared by both planes of one node (direct TCP/TLS connections and libp2p
streams), no I/O, no asyncio, no clock of its own. A listener asks ``Admission.admit(peer_id)`` before it
serves an incoming stream (and ``release(peer_id)`` once it ends): a refusal is a string naming the
limit and its value, e.g. ``"peer 12D3KooW… has 64 open streams (limit --max-streams-per-peer 64)"``.
While a message arrives, its reader calls ``reserve(peer_id, n)`` before reading each frame body and
``unreserve(peer_id, n)`` once the message is complete, refused or its stream is gone: the bytes of
messages in progress are bounded per peer (``--max-buffer-mb-per-peer``) and over all peers
(``--max-buffer-mb``); a reservation past either raises ``LimitExceededError`` naming it. Refusals are
logged through ``RefusalLog`` (buffer refusals by ``Admission`` itself when given one, stream refusals by
the listeners): the first of each kind at once, then at most one line per interval with the
count of those left out, so a hostile peer cannot flood the log. Knows nothing of sockets or sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from meshinfer.errors import ConfigError, LimitExceededError

MIB = 1024 * 1024


@dataclass(frozen=True)
class AdmissionLimits:
    """What one node accepts from all its peers together and from each one (see ``P2PConfig``)."""

    max_streams: int = 512
    max_streams_per_peer: int = 64
    max_buffer_bytes: int = 256 * MIB
    max_buffer_bytes_per_peer: int = 64 * MIB
    max_handshakes: int = 64

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_streams_per_peer", "max_buffer_bytes", "max_buffer_bytes_per_peer",
                     "max_handshakes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


def short(peer_id: str) -> str:
    """A peer id shortened for log lines and refusals."""
    return peer_id if len(peer_id) <= 16 else peer_id[:16] + "…"


class Admission:
    """Counts of open incoming streams and of buffered message bytes, per peer and in all."""

    def __init__(self, limits: AdmissionLimits | None = None, refusals: RefusalLog | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self._refusals = refusals
        self._streams: dict[str, int] = {}
        self._total_streams = 0
        self._buffered: dict[str, int] = {}
        self._total_buffered = 0
        self.handshakes = 0

    # ---- streams -----------------------------------------------------------------------------

    def admit(self, peer_id: str) -> str | None:
        """Count one more stream of ``peer_id`` and return None, or return why it is refused (counted nothing)."""
        lim = self.limits
        mine = self._streams.get(peer_id, 0)
        if mine >= lim.max_streams_per_peer:
            return (f"peer {short(peer_id)} has {mine} open streams "
                    f"(limit --max-streams-per-peer {lim.max_streams_per_peer})")
        if self._total_streams >= lim.max_streams:
            return f"{self._total_streams} streams are open (limit --max-streams {lim.max_streams})"
        self._streams[peer_id] = mine + 1
        self._total_streams += 1
        return None

    def release(self, peer_id: str) -> None:
        """One stream of ``peer_id`` admitted earlier has ended."""
        mine = self._streams.get(peer_id, 0)
        if mine <= 0:
            return
        self._total_streams -= 1
        if mine == 1:
            del self._streams[peer_id]
        else:
            self._streams[peer_id] = mine - 1

    def streams(self, peer_id: str | None = None) -> int:
        return self._total_streams if peer_id is None else self._streams.get(peer_id, 0)

    # ---- buffered bytes ----------------------------------------------------------------------

    def reserve(self, peer_id: str, n: int) -> None:
        """Account ``n`` more bytes of a message in progress from ``peer_id``; ``LimitExceededError`` (nothing
        accounted) when that would pass the per-peer or the total cap."""
        lim = self.limits
        mine = self._buffered.get(peer_id, 0)
        refusal = None
        if mine + n > lim.max_buffer_bytes_per_peer:
            refusal = (f"peer {short(peer_id)} would buffer {mine + n} bytes of unfinished messages "
                       f"(limit --max-buffer-mb-per-peer {lim.max_buffer_bytes_per_peer // MIB})")
        elif self._total_buffered + n > lim.max_buffer_bytes:
            refusal = (f"peers would buffer {self._total_buffered + n} bytes of unfinished messages "
                       f"(limit --max-buffer-mb {lim.max_buffer_bytes // MIB})")
        if refusal is not None:
            if self._refusals is not None:
                self._refusals.refused("buffers", refusal)
            raise LimitExceededError(refusal)
        self._buffered[peer_id] = mine + n
        self._total_buffered += n

    def unreserve(self, peer_id: str, n: int) -> None:
        """Give back ``n`` bytes reserved earlier by ``peer_id`` (never below zero)."""
        mine = self._buffered.get(peer_id, 0)
        n = min(n, mine)
        if n <= 0:
            return
        self._total_buffered -= n
        if mine == n:
            del self._buffered[peer_id]
        else:
            self._buffered[peer_id] = mine - n

    def buffered(self, peer_id: str | None = None) -> int:
        return self._total_buffered if peer_id is None else self._buffered.get(peer_id, 0)


class RefusalLog:
    """Warnings about refused peers at a bounded rate: per kind, the first at once, then one line per
    ``interval`` seconds saying how many were left out. ``now`` is any monotonic clock (seconds)."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float], interval: float = 10.0) -> None:
        self._log = logger
        self._clock = clock
        self._interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def refused(self, kind: str, message: str) -> bool:
        """Log ``message`` unless a line of ``kind`` went out less than ``interval`` ago; True if logged."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return False
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        more = f" ({skipped} more refusals of this kind in the last {now - last:.0f}s)" if skipped and last else ""
        self._log.warning("refused: %s%s", message, more)
        return True
