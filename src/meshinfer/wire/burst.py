"""Bursts: telling a receiver how many messages of one batch are on their way (``messages.Burst``).

Why: a server computes the steps of many sessions in one turn and sends the outputs on to the next
server one message after another; the client does the same after one batched LM-head call. A receiver
that starts its next turn with the first message that came in splits the batch, and the split pieces
then travel (and are computed, each reading all the weights again) separately from there on. A burst
tag says "``size`` messages with this id are coming", so the receiver can wait for exactly those and
no longer: there is no guessing window.

Contract: pure bookkeeping, no I/O and no clock of its own (every call takes ``now``, seconds of one
monotonic clock). ``new_burst(size)`` tags a batch of ``size`` messages (None below 2: nothing to
wait for). A receiver keeps one ``BurstTracker``: ``arrived(burst, now)`` for every tagged message
that comes in; ``held(burst, now)`` is True while members of that burst are still missing and its
first member came less than ``hold_s`` ago (a sender that is not starved of CPU sends a whole burst
within a fraction of a millisecond; a member that never comes costs the others ``hold_s`` once);
``deadline()`` is the earliest moment a held burst stops being held, to sleep until. Entries are
dropped when their burst completes or long after it stopped being held, so the tracker stays small
whatever senders do. Knows nothing of sessions, tensors or streams.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from meshinfer.wire.messages import MAX_BURST, Burst

BURST_HOLD_S = 0.008
"""Longest a receiver holds the members of an incomplete burst."""


def new_burst(size: int) -> Burst | None:
    """A fresh tag for ``size`` messages sent at once to one receiver (None when ``size`` < 2)."""
    if size < 2:
        return None
    return Burst(id=secrets.randbits(63), size=min(size, MAX_BURST))


@dataclass
class _Entry:
    size: int
    count: int
    first: float


class BurstTracker:
    """What a receiver knows of the bursts coming in: which are complete, which are still filling."""

    def __init__(self, hold_s: float = BURST_HOLD_S, *, max_entries: int = 4096) -> None:
        self.hold_s = hold_s
        self.max_entries = max_entries
        self._open: dict[int, _Entry] = {}  # incomplete bursts by id, oldest first

    def __len__(self) -> int:
        return len(self._open)

    def arrived(self, burst: Burst | None, now: float) -> None:
        """One member of ``burst`` came in (None: an untagged message, nothing to record)."""
        if burst is None:
            return
        entry = self._open.get(burst.id)
        if entry is None:
            self._prune(now)
            entry = self._open[burst.id] = _Entry(burst.size, 0, now)
        entry.count += 1
        if entry.count >= entry.size:
            del self._open[burst.id]

    def held(self, burst: Burst | None, now: float) -> bool:
        """Whether a member of ``burst`` should wait for the rest of it."""
        if burst is None:
            return False
        entry = self._open.get(burst.id)
        return entry is not None and now - entry.first < self.hold_s

    def deadline(self, now: float) -> float | None:
        """When the earliest burst still held at ``now`` stops being held (None: none is)."""
        ends = [e.first + self.hold_s for e in self._open.values() if now - e.first < self.hold_s]
        return min(ends) if ends else None

    def _prune(self, now: float) -> None:
        stale = [i for i, e in self._open.items() if now - e.first > 10 * self.hold_s]
        for i in stale:
            del self._open[i]
        while len(self._open) >= self.max_entries:  # a flood of never-completed bursts: forget the oldest
            del self._open[next(iter(self._open))]
