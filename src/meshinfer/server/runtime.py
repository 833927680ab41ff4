"""The step loop: ONE per server, schedule -> execute -> update -> deliver, batching the steps of all sessions.

Contract: ``StepLoop`` owns the served ``BlockSpan`` and a single compute thread; every torch call
(KV cache allocation, span forward, tensor decode/encode) runs under ``torch.inference_mode`` either
on that thread or, for a turn predicted to be short, inline on the event loop (see below). Sessions'
steps are queued with ``submit`` (already validated by ``session.check_step``). Each turn the loop

- schedules: ``server.scheduler.Scheduler`` (pure) picks the turn's pieces: decode steps first, then
  prefills within the token budget, chunked when long, bursts held until complete (see that module);
- executes (``execute``): per session, refuses a step whose hidden states hold NaN or inf (before touching
  the session), truncates its cache to the step's position when it holds more
  (replay or rewind) and refuses a position beyond the cache; then runs all pieces of the turn through
  the span TOGETHER (``BlockSpan.forward_batch``: one matmul per weight for all tokens, attention per
  session), grouped by the sub-span each session uses. If a batched call fails, each piece is rerun
  alone so an error only reaches its own session. A failing step's ``Result`` carries a ``SessionError``;
  what a chunked step has so far stays on its ``StepJob`` (``work``) between turns. Hidden states are decoded
  and checked on the CPU; on a GPU the turn's inputs go to the device in ONE copy (a page-locked staging
  buffer, ``non_blocking`` on CUDA) and its outputs come back in ONE copy of their concatenation, split per
  piece (on the CPU nothing is staged or copied). Running out of device memory (``models.device.
  is_out_of_memory``) in a step or in a session's KV cache allocation refuses only that session's step or
  open (``LIMIT_EXCEEDED``, naming the device and what was asked) after handing the allocator's cached blocks
  back; a batched call that ran out is rerun piece by piece like any other failure;
- updates and delivers (``deliver``): the scheduler records each step whose last chunk ran (last step id
  and output, for duplicate step ids); the turn's finished steps go, in one list of ``Finished``, to the
  ``deliver`` callback, which must not block.

Inline compute: a decode-only turn runs directly on the event loop (no thread hand-off, which costs
about as much as a network hop on a small machine) when the previous decode-only turn of no more
sessions took less than ``inline_budget_s``; everything else runs on the compute thread so the loop
stays responsive. Throughput figures (tokens computed, busy seconds, batch sizes) are kept for the
announcement; ``on_step`` (optional) sees every finished step (metrics). Knows nothing of streams, peers or the DHT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from meshinfer.errors import (
    ConfigError,
    ContextOverflowError,
    LimitExceededError,
    MeshinferError,
    UsageError,
    WireError,
)
from meshinfer.ledger.priority import PriorityPolicy
from meshinfer.models.device import device_label, is_out_of_memory, pinned, release_cached
from meshinfer.models.kv_cache import KVCache, torch_dtype
from meshinfer.models.span import BlockSpan
from meshinfer.server.scheduler import MAX_BATCH_SESSIONS, MAX_BATCH_TOKENS, Finished, Piece, Result, Scheduler
from meshinfer.server.session import Session, SessionError, StepJob
from meshinfer.tasks import stop_task
from meshinfer.types import BlockRange
from meshinfer.wire.burst import BURST_HOLD_S
from meshinfer.wire.limits import DEFAULT_LIMITS, WireLimits
from meshinfer.wire.messages import ErrorCode
from meshinfer.wire.tensor import decode_tensor, encode_tensor

log = logging.getLogger(__name__)

T = TypeVar("T")
DeliverFn = Callable[[list[Finished]], None]

INLINE_BUDGET_S = 0.02
"""A decode-only turn predicted to take less than this runs inline on the event loop."""

def _as_session_error(err: BaseException) -> SessionError:
    if isinstance(err, SessionError):
        return err
    if isinstance(err, ContextOverflowError | LimitExceededError):
        return SessionError(ErrorCode.LIMIT_EXCEEDED, str(err))
    if isinstance(err, ConfigError | UsageError | WireError):
        return SessionError(ErrorCode.BAD_REQUEST, str(err))
    if isinstance(err, MeshinferError):
        return SessionError(ErrorCode.INTERNAL, str(err))
    return SessionError(ErrorCode.INTERNAL, "internal error while computing the step")


@dataclass
class _Work:
    """What a step being computed in chunks has so far (``StepJob.work`` between turns)."""

    hidden: torch.Tensor  # [T, H] decoded input
    outputs: list[torch.Tensor]


class StepLoop:
    """Runs every session's steps through the served span, batching what is waiting each turn."""

    def __init__(self, span: BlockSpan, deliver: DeliverFn, *, limits: WireLimits = DEFAULT_LIMITS,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, max_batch_sessions: int = MAX_BATCH_SESSIONS,
                 inline_budget_s: float = INLINE_BUDGET_S, burst_hold_s: float = BURST_HOLD_S,
                 credit: Callable[[str], int] | None = None, priority: PriorityPolicy | None = None) -> None:
        self.scheduler = Scheduler(max_batch_tokens=max_batch_tokens, max_batch_sessions=max_batch_sessions,
                                   burst_hold_s=burst_hold_s, credit=credit, priority=priority)
        self.span = span
        self.device_label = device_label(span.device)
        self._deliver = deliver
        self._limits = limits
        self.inline_budget_s = inline_budget_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshinfer-compute")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sub_spans: dict[BlockRange, BlockSpan] = {span.range: span}
        self._decode_turn_s: dict[int, float] = {}  # sessions in a decode-only turn -> its last duration
        self.turns = 0
        self.busy_s = 0.0
        self.last_batch_sessions = 0
        self.on_step: Callable[[int, float, bool], None] | None = None
        """Metrics hook: called per finished step with (tokens, seconds since it arrived, ok)."""

    # ---- compute-thread helpers --------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread under inference mode."""
        def run() -> T:
            with torch.inference_mode():
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def sub_span(self, blocks: BlockRange) -> BlockSpan:
        """The blocks ``blocks`` (inside the served span) as a ``BlockSpan`` sharing their weights."""
        if blocks not in self._sub_spans:
            self._sub_spans[blocks] = self.span.sub(blocks)
        return self._sub_spans[blocks]

    async def new_cache(self, blocks: BlockRange, max_length: int) -> KVCache:
        """A KV cache for a session on ``blocks`` (allocated on the compute thread); out of device memory:
        ``SessionError(LIMIT_EXCEEDED)`` naming the device and the size asked."""
        sub = self.sub_span(blocks)
        try:
            return await self.call(sub.new_cache, max_length)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            release_cached(sub.device)
            asked = sub.cache_bytes(max_length)
            log.warning("out of memory on %s allocating a KV cache of %d tokens (%.1f MiB) for blocks %s",
                        self.device_label, max_length, asked / 2**20, blocks)
            raise SessionError(ErrorCode.LIMIT_EXCEEDED,
                               f"out of memory on {self.device_label} allocating a KV cache of {max_length} tokens "
                               f"for blocks {blocks} ({asked / 2**20:.1f} MiB); open a shorter session or use "
                               f"another server") from None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="step-loop")

    async def stop(self) -> None:
        """Stop taking turns (a turn being computed finishes on its thread), then stop the thread."""
        await stop_task(self._task)
        self._task = None
        self.scheduler.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    # ---- queueing ----------------------------------------------------------------------------

    def submit(self, job: StepJob) -> None:
        """Queue a validated step of ``job.session``; it runs after that session's earlier steps."""
        if self.scheduler.submit(job):
            self._wake.set()

    def drop(self, session: Session) -> None:
        """Forget a session's queued steps (it ended); a step in progress is discarded when done."""
        self.scheduler.drop(session)

    @property
    def queued_steps(self) -> int:
        return self.scheduler.queued_steps

    def queued_for(self, peer: str) -> int:
        """Steps the sessions of ``peer`` have waiting or being computed (``Scheduler.queued_for``)."""
        return self.scheduler.queued_for(peer)

    # ---- the loop ----------------------------------------------------------------------------

    def schedule(self) -> list[Piece]:
        """The pieces of the next turn (``Scheduler.schedule`` now)."""
        return self.scheduler.schedule(time.monotonic())

    def execute(self, pieces: list[Piece]) -> list[Result | None]:
        """Compute ``pieces`` (compute thread or inline); one entry per piece: its step's result when
        this was the step's last piece, else None."""
        started = time.perf_counter()
        out: list[Result | None] = [None] * len(pieces)
        runnable: list[tuple[int, Piece, torch.Tensor]] = []
        with torch.inference_mode():
            for i, piece in enumerate(pieces):
                try:
                    runnable.append((i, piece, self._prepare(piece)))
                except Exception as err:
                    out[i] = self._failed(piece, err)
            inputs = self._to_device([x for _, _, x in runnable])  # one copy per turn on a GPU
            groups: dict[BlockRange, list[tuple[int, Piece, torch.Tensor]]] = {}
            for (i, piece, _), x in zip(runnable, inputs, strict=True):
                groups.setdefault(piece.job.session.span, []).append((i, piece, x))
            done: list[tuple[int, Piece]] = []
            outputs: list[torch.Tensor] = []  # [count_i, H] each, on the span's device
            for blocks, items in groups.items():
                for (i, piece, _), output in zip(items, self._forward_group(self._sub_spans[blocks], items, out),
                                                 strict=True):
                    if output is not None:
                        done.append((i, piece))
                        outputs.append(output)
            for (i, piece), output in zip(done, self._to_host(outputs), strict=True):
                out[i] = self._finish(piece, output)
        elapsed = time.perf_counter() - started
        self.turns += 1
        self.busy_s += elapsed
        self.last_batch_sessions = len(pieces)
        if all(p.job.tokens == 1 for p in pieces):
            self._decode_turn_s[len(pieces)] = elapsed
        if log.isEnabledFor(logging.DEBUG):
            log.debug("turn %d: %d piece(s), %d token(s) in %.2f ms", self.turns, len(pieces),
                      sum(p.count for p in pieces), elapsed * 1000)
        return out

    def _prepare(self, piece: Piece) -> torch.Tensor:  # -> [count, H], the piece's input
        job, session = piece.job, piece.job.session
        cache: KVCache | None = session.cache
        if cache is None or session.ended:
            raise SessionError(ErrorCode.UNKNOWN_SESSION, f"session {session.short_id} has ended")
        work: _Work | None = job.work
        if work is None:  # the step's first piece: check its input, then place the cache at the step's position
            hidden = decode_tensor(job.hidden, self._limits).to(self.span.dtype)  # [T, H]
            if not bool(torch.isfinite(hidden).all()):
                raise SessionError(ErrorCode.BAD_REQUEST, f"step {job.step_id}'s hidden states contain NaN or inf "
                                                          f"(in {self.span.dtype}); refused, the session is unchanged")
            if job.position > cache.length:
                raise SessionError(
                    ErrorCode.BAD_REQUEST,
                    f"step {job.step_id} starts at position {job.position} but the session holds only "
                    f"{cache.length} tokens (send the missing tokens first)",
                )
            if job.position < cache.length:
                cache.truncate(job.position)  # replay or rewind: forget what follows
            work = job.work = _Work(hidden, [])
        return work.hidden[piece.start:piece.start + piece.count]

    def _to_device(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The turn's inputs ([count_i, H] each, on the CPU) on the span's device: one staged copy (none on
        the CPU); where the device has no room for them, as they are (each piece's forward then moves its own)."""
        device = self.span.device
        if device.type == "cpu" or not xs:
            return xs
        sizes = [x.shape[0] for x in xs]
        try:
            # a fresh page-locked block per turn on purpose: torch's caching host allocator reuses freed blocks and
            # records the copy's stream event, so a block is never rewritten while a non_blocking copy reads it (a
            # buffer kept here would need that event bookkeeping by hand)
            stage = pinned((sum(sizes), xs[0].shape[1]), xs[0].dtype, device)  # [N, H] host, page-locked on CUDA
            torch.cat(xs, out=stage)
            return list(stage.to(device, non_blocking=True).split(sizes))  # [count_i, H] views on the device
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            release_cached(device)
            return xs

    def _to_host(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The turn's outputs ([count_i, H] each) on the CPU: one copy of their concatenation, split per piece
        (waits for the device: the turn's work is done on return). Nothing to do on the CPU."""
        if self.span.device.type == "cpu" or not outputs:
            return outputs
        try:
            flat = torch.cat(outputs).to("cpu")  # [N, H]
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            release_cached(self.span.device)
            return [o.to("cpu") for o in outputs]
        return list(flat.split([o.shape[0] for o in outputs]))

    def _forward_group(self, sub: BlockSpan, items: list[tuple[int, Piece, torch.Tensor]],
                       out: list[Result | None]) -> list[torch.Tensor | None]:
        caches = [piece.job.session.cache for _, piece, _ in items]
        try:
            return list(sub.forward_batch([(x, c) for (_, _, x), c in zip(items, caches, strict=True)]))
        except Exception as err:
            if is_out_of_memory(err):
                release_cached(sub.device)
            if len(items) == 1:
                i, piece, _ = items[0]
                out[i] = self._failed(piece, err)
                return [None]
        results: list[torch.Tensor | None] = []  # isolate the failing piece(s): rerun each alone
        for (i, piece, x), cache in zip(items, caches, strict=True):
            try:
                results.append(sub(x.to(sub.device).unsqueeze(0), cache)[0])  # [count, H]
            except Exception as err:
                out[i] = self._failed(piece, err)
                results.append(None)
        return results

    def _finish(self, piece: Piece, output: torch.Tensor) -> Result | None:
        job = piece.job
        work: _Work = job.work
        work.outputs.append(output)
        if not piece.last:
            return None
        job.work = None
        full = work.outputs[0] if len(work.outputs) == 1 else torch.cat(work.outputs, dim=0)
        return Result(output=encode_tensor(full.to(torch_dtype(job.session.dtype)).contiguous()))

    def _failed(self, piece: Piece, err: BaseException) -> Result:
        piece.job.work = None
        if is_out_of_memory(err):
            release_cached(self.span.device)
            job = piece.job
            log.warning("out of memory on %s computing step %d of session %s (%d tokens at position %d)",
                        self.device_label, job.step_id, job.session.short_id, piece.count, job.position + piece.start)
            return Result(error=SessionError(
                ErrorCode.LIMIT_EXCEEDED,
                f"out of memory on {self.device_label} computing step {job.step_id} ({piece.count} tokens at "
                f"position {job.position + piece.start}); retry it with fewer tokens per step or use another server"))
        if not isinstance(err, MeshinferError):
            log.error("step %d of session %s failed: %r", piece.job.step_id, piece.job.session.short_id, err,
                      exc_info=err)
        return Result(error=_as_session_error(err))

    def deliver(self, pieces: list[Piece], results: list[Result | None]) -> None:
        """Update the scheduler with the turn's results and hand the finished steps to the deliver callback
        (non-blocking)."""
        now = time.monotonic()
        finished = self.scheduler.update(pieces, results, now)
        if self.on_step is not None:
            for done in finished:
                with contextlib.suppress(Exception):
                    self.on_step(done.job.tokens, now - done.job.arrived, done.output is not None)
        if finished:
            try:
                self._deliver(finished)
            except Exception:
                log.exception("delivering the results of %d step(s) failed", len(finished))

    def _inline(self, pieces: list[Piece]) -> bool:
        if any(p.job.tokens != 1 for p in pieces):
            return False
        known = [s for n, s in self._decode_turn_s.items() if n >= len(pieces)]
        return bool(known) and min(known) < self.inline_budget_s

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pieces = self.schedule()
            if not pieces:
                self._wake.clear()
                deadline = self.scheduler.deadline(time.monotonic())
                if deadline is None:
                    await self._wake.wait()
                else:  # steps held for the rest of their burst: until it comes, or the hold ends
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            await self._wake.wait()
                continue
            inline = self._inline(pieces)  # decided once per turn: the turn's timing changes the answer
            try:
                results: list[Result | None]
                if inline:
                    results = self.execute(pieces)
                else:
                    results = await loop.run_in_executor(self._executor, self.execute, pieces)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the executor itself failed: report, keep serving
                log.exception("step loop turn failed")
                results = [self._failed(p, err) for p in pieces]
            self.deliver(pieces, results)
            if inline:
                await asyncio.sleep(0)  # let the network in between inline turns
