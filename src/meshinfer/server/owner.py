"""Owner-aware serving (issue 23): when a lent machine serves and when it gives itself back. Pure.

Contract: no clock of its own, no I/O, no torch. ``parse_schedule(text)`` reads ``--schedule`` (time windows in
the machine's local time, e.g. ``"mon-fri 18:00-08:00, sat-sun"``; a window may cross midnight, when it belongs
to the day it starts on) into a ``Schedule`` whose ``allows(weekday, minute)`` says whether serving is allowed
then; a bad text is a one-line ``ConfigError`` naming the flag and the form. ``OwnerGate`` decides from samples
of the share of the machine's CPU used by processes other than the server (``observe(now, others, weekday,
minute)``) whether to ``serve`` or ``yield``:

- outside the schedule: ``yield`` at once;
- with ``--when idle``: ``yield`` once the others' share has stayed at or above ``busy_share`` for ``busy_for``
  seconds; ``serve`` again once it has stayed below for ``idle_for`` seconds (hysteresis: one spike neither
  stops nor restarts serving); a gap in the samples longer than ``max_gap`` restarts both timers;
- otherwise ``serve``.

Each decision comes with its reason (for the log and the dashboard). ``threads_for(max_load, cores)`` is the
``--max-load`` share of the cores as a torch thread count (at least one).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from meshinfer.errors import ConfigError

Decision = Literal["serve", "yield"]
WHEN_CHOICES = ("always", "idle")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_DAY = 24 * 60
_FORM = "e.g. 'mon-fri 18:00-08:00, sat-sun' (days, a time window HH:MM-HH:MM, or both; local time)"
_TIME = re.compile(r"(\d{1,2}):(\d{2})")


@dataclass(frozen=True)
class Window:
    days: frozenset[int]
    """Weekdays the window starts on (0 = Monday)."""
    start: int
    """Minute of the day it opens (inclusive)."""
    end: int
    """Minute of the day it closes (exclusive; <= start: the next day; start == end == 0: the whole day)."""

    def allows(self, weekday: int, minute: int) -> bool:
        if self.start == 0 and self.end == MINUTES_PER_DAY:
            return weekday in self.days
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # crosses midnight: the evening of a listed day, or the morning after one
        return (weekday in self.days and minute >= self.start) or ((weekday - 1) % 7 in self.days and minute < self.end)


@dataclass(frozen=True)
class Schedule:
    windows: tuple[Window, ...]

    def allows(self, weekday: int, minute: int) -> bool:
        return any(w.allows(weekday, minute) for w in self.windows)


def _minute(text: str) -> int:
    match = _TIME.fullmatch(text)
    if match is None:
        raise ConfigError(f"--schedule: {text!r} is not a time HH:MM; {_FORM}")
    hours, minutes = int(match.group(1)), int(match.group(2))
    if hours > 24 or minutes > 59 or (hours == 24 and minutes):
        raise ConfigError(f"--schedule: {text!r} is not a time of day; {_FORM}")
    return hours * 60 + minutes


def _days(text: str) -> frozenset[int]:
    parts = text.split("-")
    if len(parts) > 2 or any(p not in DAYS for p in parts):
        raise ConfigError(f"--schedule: {text!r} is not a day or a day range like mon-fri; {_FORM}")
    first, last = DAYS.index(parts[0]), DAYS.index(parts[-1])
    return frozenset((first + i) % 7 for i in range((last - first) % 7 + 1))


def parse_schedule(text: str) -> Schedule:
    windows: list[Window] = []
    for item in text.lower().split(","):
        words = item.split()
        if not words or len(words) > 2:
            raise ConfigError(f"--schedule: {item.strip()!r} is not a window; {_FORM}")
        days, span = frozenset(range(7)), None
        for word in words:
            if ":" in word:
                if span is not None:
                    raise ConfigError(f"--schedule: two time windows in {item.strip()!r}; {_FORM}")
                span = word
            else:
                days = _days(word)
        start, end = 0, MINUTES_PER_DAY
        if span is not None:
            bounds = span.split("-")
            if len(bounds) != 2:
                raise ConfigError(f"--schedule: {span!r} is not a window HH:MM-HH:MM; {_FORM}")
            start, end = _minute(bounds[0]), _minute(bounds[1])
            if start == end:
                raise ConfigError(f"--schedule: the window {span!r} is empty; {_FORM}")
            if start == MINUTES_PER_DAY:
                raise ConfigError(f"--schedule: a window cannot open at 24:00; {_FORM}")
            end = end % MINUTES_PER_DAY if end != MINUTES_PER_DAY else end
            if end == 0:
                end = MINUTES_PER_DAY
        windows.append(Window(days, start, end))
    return Schedule(tuple(windows))


@dataclass(frozen=True)
class OwnerPolicy:
    when: str = "always"
    busy_share: float = 0.5
    busy_for: float = 5.0
    idle_for: float = 30.0
    schedule: Schedule | None = None
    max_gap: float = 10.0

    def __post_init__(self) -> None:
        if self.when not in WHEN_CHOICES:
            raise ConfigError(f"--when must be one of {', '.join(WHEN_CHOICES)}, got {self.when!r}")
        if not 0 < self.busy_share < 1:
            raise ConfigError(f"--busy-share must be in (0, 1), got {self.busy_share:g}")
        for name in ("busy_for", "idle_for"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be seconds >= 0, got {value:g}")


class OwnerGate:
    """The serve/yield state of one server (see the module docstring); starts serving."""

    def __init__(self, policy: OwnerPolicy) -> None:
        self.policy = policy
        self.decision: Decision = "serve"
        self.reason = "serving"
        self._since: float | None = None
        """When the others' share last crossed to the side that would flip the decision (None: not crossed)."""
        self._last: float | None = None

    def observe(self, now: float, others: float, weekday: int, minute: int) -> Decision:
        """One sample: ``others`` = share (0..1) of the machine's CPU used by other processes since the last one."""
        p = self.policy
        if self._last is not None and now - self._last > p.max_gap:
            self._since = None
        self._last = now
        if p.schedule is not None and not p.schedule.allows(weekday, minute):
            self._since = None
            return self._set("yield", "outside --schedule")
        if p.when != "idle":
            return self._set("serve", "serving")
        busy = others >= p.busy_share
        if self.reason == "outside --schedule":  # the schedule just opened: follow the machine's state at once
            self._since = None
            return self._set("yield", f"other processes use {others:.0%} of the CPU") if busy else \
                self._set("serve", "serving")
        wants = "yield" if busy else "serve"
        if wants == self.decision:
            self._since = None
            return self.decision
        if self._since is None:
            self._since = now
        hold = p.busy_for if busy else p.idle_for
        if now - self._since >= hold:
            self._since = None
            if busy:
                return self._set("yield", f"other processes used {others:.0%} of the CPU for {p.busy_for:g} s "
                                          f"(--busy-share {p.busy_share:g})")
            return self._set("serve", f"the machine was idle for {p.idle_for:g} s")
        return self.decision

    def _set(self, decision: Decision, reason: str) -> Decision:
        self.decision, self.reason = decision, reason
        return decision


def threads_for(max_load: float, cores: int) -> int:
    """Torch compute threads for ``--max-load`` (a share of ``cores``): at least 1."""
    if not 0 < max_load <= 1:
        raise ConfigError(f"--max-load must be a share of the CPU in (0, 1], got {max_load:g}")
    return max(1, math.floor(max_load * cores + 1e-9))
