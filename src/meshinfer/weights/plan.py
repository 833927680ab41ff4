"""Which piece to ask which seeder for next, and which seeders to avoid: pure decisions of a fetch.

Contract: ``PiecePlanner`` is handed the pieces still needed, each with the seeders that hold it, and is
then driven by the fetcher's workers: ``take(peer, now)`` gives a worker its next piece (or None),
``done``/``reject``/``unavailable``/``peer_failed`` report outcomes. At the start every piece is assigned to
one of its holders in turn (round robin, so the load spreads over all seeders); a worker first takes its own
peer's pieces, and once those are gone it takes over the last pending pieces of another peer (the one with
most left) when that peer lost them (failed or banned), when the taker came back from a failure (its own
share went to others), or once ``steal_after`` seconds have passed since the start (a slow seeder does not
hold the tail of a fetch back; a late starter still gets its share). A piece
is never in flight twice. A rejected piece (wrong bytes) bans its sender and goes back to another holder;
a piece with no holder left makes ``stuck()`` list it. Banned and failing peers are kept in a
``weights.bans.PeerBans`` (the client's failover uses the same class), which may be shared by several
fetches. Time is passed in; no I/O, no asyncio, no network.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from meshinfer.weights.bans import PeerBans

if TYPE_CHECKING:
    from _typeshed import SupportsRichComparison

__all__ = ["PeerBans", "PiecePlanner", "holders_by_piece"]  # PeerBans: re-exported for fetch users

P = TypeVar("P", bound="SupportsRichComparison")  # a piece: any hashable, ordered value (a PieceRef in practice)


class PiecePlanner(Generic[P]):
    """Hands out pieces to per-peer workers (see the module docstring)."""

    def __init__(self, holders: Mapping[P, Sequence[str]], *, now: float, bans: PeerBans | None = None,
                 steal_after: float = 1.0) -> None:
        self.bans = bans if bans is not None else PeerBans()
        self.steal_after = steal_after
        self.start = now
        self._holders: dict[P, list[str]] = {p: sorted(set(h)) for p, h in holders.items()}
        self._queues: dict[str, deque[P]] = {}
        self._owner: dict[P, str] = {}
        self._pending: set[P] = set(self._holders)
        self._in_flight: dict[P, str] = {}
        self._lost: set[str] = set()
        self._returned: set[str] = set()
        self._turn = 0
        for piece in sorted(self._pending):
            self._assign(piece, now)

    # ---- queries -----------------------------------------------------------------------------

    @property
    def remaining(self) -> int:
        """Pieces not done yet (pending or in flight)."""
        return len(self._pending) + len(self._in_flight)

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    def in_flight(self, peer: str | None = None) -> list[P]:
        return [p for p, who in self._in_flight.items() if peer is None or who == peer]

    def queued(self, peer: str) -> int:
        return sum(1 for p in self._queues.get(peer, ()) if self._owner.get(p) == peer and p in self._pending)

    def stuck(self, now: float) -> list[P]:
        """Pending pieces that no holder can serve any more (all dropped, unable or banned)."""
        return sorted(p for p in self._pending if not any(not self.bans.banned(h, now) for h in self._holders[p]))

    # ---- decisions ---------------------------------------------------------------------------

    def _candidates(self, piece: P, now: float) -> list[str]:
        return [h for h in self._holders[piece] if h not in self._lost and not self.bans.banned(h, now)]

    def _assign(self, piece: P, now: float) -> None:
        candidates = self._candidates(piece, now)
        if not candidates:
            self._owner.pop(piece, None)
            return
        owner = candidates[self._turn % len(candidates)]
        self._turn += 1
        self._owner[piece] = owner
        self._queues.setdefault(owner, deque()).append(piece)

    def take(self, peer: str, now: float) -> P | None:
        """The next piece ``peer`` should send, or None (nothing for it now)."""
        if not self.bans.usable(peer, now) or peer in self._lost:
            return None
        queue = self._queues.get(peer)
        while queue:
            piece = queue.popleft()
            if piece in self._pending and self._owner.get(piece) == peer:
                return self._start(piece, peer)
        return self._steal(peer, now)

    def _steal(self, peer: str, now: float) -> P | None:
        time_up = now - self.start >= self.steal_after or peer in self._returned  # a returning peer lost its share
        victims = sorted(((self.queued(other), other) for other in self._queues if other != peer), reverse=True)
        for _count, other in victims:
            if not (time_up or other in self._lost or not self.bans.usable(other, now)):
                continue
            queue = self._queues[other]
            for piece in reversed(queue):  # the tail: the pieces its owner would reach last
                if piece in self._pending and self._owner.get(piece) == other and peer in self._holders[piece]:
                    self._owner[piece] = peer
                    return self._start(piece, peer)
        for piece in sorted(p for p in self._pending if p not in self._owner):  # orphans
            if peer in self._candidates(piece, now):
                return self._start(piece, peer)
        return None

    def _start(self, piece: P, peer: str) -> P:
        self._pending.discard(piece)
        self._owner[piece] = peer
        self._in_flight[piece] = peer
        return piece

    def done(self, piece: P, peer: str) -> None:
        """``peer`` delivered ``piece`` and it verified (also when it had been handed to another peer since:
        then that peer's copy, if it is in flight, is simply not needed any more)."""
        self._pending.discard(piece)
        self._in_flight.pop(piece, None)
        self._owner.pop(piece, None)
        self.bans.succeed(peer)

    def give_back(self, piece: P, peer: str, now: float) -> None:
        """``peer``'s request for ``piece`` ended without an answer: let another holder have it."""
        if self._in_flight.get(piece) == peer:
            self._requeue(piece, now)

    def _requeue(self, piece: P, now: float) -> None:
        self._in_flight.pop(piece, None)
        self._pending.add(piece)
        self._assign(piece, now)

    def reject(self, piece: P, peer: str, now: float) -> None:
        """``peer`` sent wrong bytes for ``piece``: ban it, and give its pieces to other holders."""
        self.bans.ban(peer, now)
        self._lose(peer, now)  # requeues ``piece`` too (it was in flight from ``peer``)

    def unavailable(self, piece: P, peer: str, now: float) -> None:
        """``peer`` does not have ``piece`` after all: never ask it for that piece again."""
        if peer in self._holders.get(piece, []):
            self._holders[piece].remove(peer)
        if self._in_flight.get(piece) == peer:
            self._requeue(piece, now)

    def peer_failed(self, peer: str, now: float) -> float:
        """The connection to ``peer`` failed: back off from it and give its pieces to others; returns the wait."""
        wait = self.bans.fail(peer, now)
        self._lose(peer, now)
        return wait

    def peer_back(self, peer: str) -> None:
        """``peer`` may be asked again (its backoff has passed); it may take over others' pieces at once."""
        if peer in self._lost:
            self._lost.discard(peer)
            self._returned.add(peer)

    def drop_peer(self, peer: str, now: float) -> None:
        """Stop using ``peer`` for this fetch (it failed too often)."""
        self._lose(peer, now)
        for piece, holders in self._holders.items():
            if peer in holders:
                holders.remove(peer)
                if piece in self._pending and piece not in self._owner:
                    self._assign(piece, now)

    def _lose(self, peer: str, now: float) -> None:
        self._lost.add(peer)
        lost = [p for p, who in self._in_flight.items() if who == peer]
        lost += [p for p in self._queues.pop(peer, ()) if p in self._pending and self._owner.get(p) == peer]
        for piece in lost:
            self._owner.pop(piece, None)
            self._requeue(piece, now)


def holders_by_piece(groups: Iterable[tuple[Sequence[P], Sequence[str]]]) -> dict[P, list[str]]:
    """{piece: holders} from (pieces of a group, peers holding that group) pairs."""
    out: dict[P, list[str]] = {}
    for pieces, peers in groups:
        for piece in pieces:
            out[piece] = list(peers)
    return out
