"""``HeadBatcher``: the LM head for every generation running on a client's event loop, batched in cohorts.

Contract: ``await logits(hidden, burst, peer)`` returns the logits of one session's last hidden state
([H] -> [V] float32, on the head's device: the rows of a call are stacked where they are, the CPU, and moved
to the device as one tensor) and the burst tag (``wire.burst``) its NEXT step to ``peer`` (the first server of
its route) should carry. Hidden states handed in are computed together, one matmul per call: the head
is memory-bound (its weights are read once per call whatever the rows), so many rows cost little more
than one. Which rows go together:

- a row whose result came as part of a burst (the last server's outputs of one turn) waits until the
  rest of that burst is in, at most ``BURST_HOLD_S``, so the batch that left the server together stays
  together; rows without a tag never wait;
- a call takes at most ``ceil(active / cohorts)`` rows (``active``: generations running now). With
  ``cohorts`` = 2 the sessions move through the route as two cohorts: while one is in the servers, the
  other is in this head, and every server works on one cohort while the next server works on the other
  (a pipeline; one cohort of everyone would leave all but one stage idle). More cohorts keep more
  stages busy at the cost of smaller batches; 1 means one batch of everyone;
- rows taken by one call whose next steps go to the same server get one fresh burst tag for them.

``await logits_rows(hidden[R, H], burst, peer)`` is the same for several rows of ONE session (a speculative verify step:
[R, V]); its rows go into the same matmul and count as one session's entry in a call. Rows whose caller was
cancelled are dropped. With one generation running, a row is computed at once
(no tag, no wait). Knows nothing of sessions or the network: everything runs on the calling loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass

import torch

from meshinfer.client.config import DEFAULT_COHORTS
from meshinfer.errors import ConfigError
from meshinfer.models.head import ClientHead
from meshinfer.wire.burst import BURST_HOLD_S, BurstTracker, new_burst
from meshinfer.wire.messages import Burst


@dataclass
class _Row:
    hidden: torch.Tensor  # [R, H]: one session's rows
    burst: Burst | None
    peer: str
    future: asyncio.Future[tuple[torch.Tensor, Burst | None]]


class HeadBatcher:
    """Batched LM-head calls for the generations on one event loop (see the module docstring)."""

    def __init__(self, head: ClientHead, *, cohorts: int = DEFAULT_COHORTS, hold_s: float = BURST_HOLD_S) -> None:
        if cohorts < 1:
            raise ConfigError(f"cohorts must be >= 1, got {cohorts}")
        self.head = head
        self.cohorts = cohorts
        self.active = 0
        """Generations running now (they set the cohort size)."""
        self.batches = 0
        self.rows = 0
        self._bursts = BurstTracker(hold_s)
        self._pending: list[_Row] = []
        self._handle: asyncio.Handle | None = None  # the scheduled _run (a timer while rows are held)

    async def logits(self, hidden: torch.Tensor, burst: Burst | None = None,
                     peer: str = "") -> tuple[torch.Tensor, Burst | None]:  # [H] -> ([V] float32, tag)
        out, tag = await self.logits_rows(hidden.unsqueeze(0), burst, peer)  # [1, V]
        return out[0], tag

    async def logits_rows(self, hidden: torch.Tensor, burst: Burst | None = None,
                   peer: str = "") -> tuple[torch.Tensor, Burst | None]:  # [R, H] -> ([R, V] float32, tag)
        """The logits of several rows of one session (see the module docstring)."""
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise ConfigError(f"expected hidden states [rows, hidden], got {tuple(hidden.shape)}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[torch.Tensor, Burst | None]] = loop.create_future()
        self._bursts.arrived(burst, time.monotonic())
        self._pending.append(_Row(hidden, burst, peer, future))
        if self._handle is None or isinstance(self._handle, asyncio.TimerHandle):
            self._schedule(loop, 0.0)  # after the other results of this loop iteration are in
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = loop.call_soon(self._run) if delay <= 0 else loop.call_later(delay, self._run)

    def _run(self) -> None:
        self._handle = None
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        self._pending = [r for r in self._pending if not r.future.cancelled()]
        ready = [r for r in self._pending if not self._bursts.held(r.burst, now)]
        if not ready:
            deadline = self._bursts.deadline(now)
            if self._pending:
                self._schedule(loop, max(0.0, (deadline or now) - now))
            return
        take = ready[:max(1, math.ceil(self.active / self.cohorts))]
        taken = {id(r) for r in take}
        self._pending = [r for r in self._pending if id(r) not in taken]
        try:
            with torch.inference_mode():
                rows = torch.cat([r.hidden for r in take])  # [sum R, H] where the rows are (the CPU: the wire's)
                out = self.head.logits(rows)  # [sum R, V] float32 on the head's device: ONE copy of the rows there
        except Exception as err:
            for r in take:
                r.future.set_exception(err)
        else:
            self.batches += 1
            self.rows += len(take)
            tags = {peer: new_burst(n) for peer, n in Counter(r.peer for r in take).items()}
            parts = torch.split(out, [r.hidden.shape[0] for r in take])  # [R, V] each
            for r, part in zip(take, parts, strict=True):
                r.future.set_result((part, tags[r.peer]))
        if self._pending and self._handle is None:  # after the sessions just answered have sent their steps
            self._schedule(loop, 0.0)
