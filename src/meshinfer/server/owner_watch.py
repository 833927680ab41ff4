"""The effectful half of owner-aware serving (issue 23): measure the owner's load, drain and come back.

Contract: ``CpuProbe.sample()`` is the share (0..1) of the whole machine's CPU time used, since the previous
sample, by processes other than this one and its descendants (the ``p2pd`` daemon counts as ours): system busy
time (user, nice, system, irq, softirq; not idle, iowait or steal) less this process tree's, over wall time x
cores (``psutil``). ``OwnerWatch.run()`` samples every ``interval`` s, feeds ``server.owner.OwnerGate`` with the
local weekday and minute, and calls ``pause(reason)`` when the gate turns to ``yield`` and ``resume()`` when it
turns back; it awaits each (a pause drains: up to ``--drain-timeout``), so decisions never overlap. GPU load of
other processes is not measured (limit: a GPU server lent by an owner who games or trains is yielded only by the
CPU threshold or the schedule). Knows nothing of sessions, the DHT or the model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

import psutil

from meshinfer.server.owner import OwnerGate

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0


def _busy(times: object) -> float:
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


class CpuProbe:
    """Other processes' share of the machine's CPU between two samples (see the module docstring)."""

    def __init__(self, pid: int | None = None) -> None:
        self._process = psutil.Process(pid or os.getpid())
        self._cores = psutil.cpu_count() or 1
        self._last = self._read()

    def _own(self) -> float:
        total = 0.0
        for proc in [self._process, *self._process.children(recursive=True)]:
            try:
                t = proc.cpu_times()
            except psutil.Error:  # a child that just ended: its time moves to children_* of its parent
                continue
            total += t.user + t.system
            if proc is self._process:
                total += t.children_user + t.children_system
        return total

    def _read(self) -> tuple[float, float, float]:
        return time.monotonic(), _busy(psutil.cpu_times()), self._own()

    def sample(self) -> float:
        now = self._read()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        wall = (t1 - t0) * self._cores
        if wall <= 0:
            return 0.0
        return min(1.0, max(0.0, ((busy1 - busy0) - (own1 - own0)) / wall))


class OwnerWatch:
    def __init__(self, gate: OwnerGate, pause: Callable[[str], Awaitable[None]], resume: Callable[[], Awaitable[None]],
                 *, probe: CpuProbe | None = None, interval: float = DEFAULT_INTERVAL) -> None:
        self.gate = gate
        self.probe = probe or CpuProbe()
        self._pause, self._resume = pause, resume
        self.interval = interval
        self.last_share = 0.0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.last_share = others = self.probe.sample()
            local = time.localtime()
            before = self.gate.decision
            decision = self.gate.observe(time.monotonic(), others, local.tm_wday, local.tm_hour * 60 + local.tm_min)
            if decision == before:
                continue
            try:
                if decision == "yield":
                    log.info("giving the machine back to its owner (%s): draining", self.gate.reason)
                    await self._pause(self.gate.reason)
                else:
                    log.info("serving again (%s)", self.gate.reason)
                    await self._resume()
            except Exception:
                log.exception("could not %s", "pause" if decision == "yield" else "resume")
            self.probe.sample()  # the drain's own work is not the owner's: start a fresh interval
