"""The step loop: ONE per server, schedule -> execute -> deliver, with compute on one worker thread.

Contract: ``StepLoop`` owns the served ``BlockSpan`` and a single-thread executor; every torch call
(KV cache allocation, span forward, tensor decode/encode) runs on that thread under
``torch.inference_mode``, so the asyncio event loop only moves messages and stays responsive.
Sessions' steps are queued with ``submit`` (already validated by ``session.check_step``); each turn
the loop

- schedules: picks the next step among the heads of the sessions' queues (a session's steps run in
  order, one at a time), decode steps (1 token) before prefill chunks, oldest first;
- executes: truncates the session's cache to the step's position when it holds more (replay or
  rewind), refuses a position beyond the cache, runs the session's sub-span, encodes the output in the
  session's dtype; a failing step becomes a ``SessionError`` for that step only;
- delivers: records the session's last step id and output (for duplicate step ids) and hands the
  result to the ``deliver`` callback, which must not block (it schedules the network sends).

A session may use a sub-range of the served span: ``sub_span(range)`` builds (once) a ``BlockSpan``
sharing the served blocks, and its cache covers only those blocks. For this issue a turn runs one
step; the schedule/execute/deliver split is where batching plugs in. Knows nothing of streams,
peers or the DHT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from meshinfer.errors import ConfigError, ContextOverflowError, LimitExceededError, MeshinferError, WireError
from meshinfer.models.kv_cache import KVCache, torch_dtype
from meshinfer.models.span import BlockSpan
from meshinfer.server.session import Session, SessionError, StepJob
from meshinfer.types import BlockRange
from meshinfer.wire.limits import DEFAULT_LIMITS, WireLimits
from meshinfer.wire.messages import ErrorCode
from meshinfer.wire.tensor import Tensor, decode_tensor, encode_tensor

log = logging.getLogger(__name__)

T = TypeVar("T")
Result = tuple[Tensor | None, SessionError | None]
DeliverFn = Callable[[StepJob, Tensor | None, SessionError | None], None]


def _as_session_error(err: BaseException) -> SessionError:
    if isinstance(err, SessionError):
        return err
    if isinstance(err, ContextOverflowError | LimitExceededError):
        return SessionError(ErrorCode.LIMIT_EXCEEDED, str(err))
    if isinstance(err, ConfigError | WireError):
        return SessionError(ErrorCode.BAD_REQUEST, str(err))
    if isinstance(err, MeshinferError):
        return SessionError(ErrorCode.INTERNAL, str(err))
    return SessionError(ErrorCode.INTERNAL, "internal error while computing the step")


class StepLoop:
    """Runs every session's steps through the served span, one turn at a time."""

    def __init__(self, span: BlockSpan, deliver: DeliverFn, *, limits: WireLimits = DEFAULT_LIMITS) -> None:
        self.span = span
        self._deliver = deliver
        self._limits = limits
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshinfer-compute")
        self._queued: dict[Session, None] = {}  # sessions with pending steps, in arrival order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sub_spans: dict[BlockRange, BlockSpan] = {span.range: span}
        self.steps_done = 0
        self.tokens_done = 0

    # ---- compute-thread helpers --------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread under inference mode."""
        def run() -> T:
            with torch.inference_mode():
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def sub_span(self, blocks: BlockRange) -> BlockSpan:
        """The blocks ``blocks`` (inside the served span) as a ``BlockSpan`` sharing their weights."""
        served = self.span.range
        if not (served.start <= blocks.start and blocks.end <= served.end):
            raise ConfigError(f"blocks {blocks} are not inside the served span {served}")
        if blocks not in self._sub_spans:
            layers = list(self.span.layers)[blocks.start - served.start:blocks.end - served.start]
            self._sub_spans[blocks] = BlockSpan(self.span.spec, blocks, layers, self.span.dtype, self.span.device)
        return self._sub_spans[blocks]

    async def new_cache(self, blocks: BlockRange, max_length: int) -> KVCache:
        """A KV cache for a session on ``blocks`` (allocated on the compute thread)."""
        sub = self.sub_span(blocks)
        return await self.call(sub.new_cache, max_length)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="step-loop")

    async def stop(self) -> None:
        """Stop taking turns (a step being computed finishes on its thread), then stop the thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._queued.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    # ---- queueing ----------------------------------------------------------------------------

    def submit(self, job: StepJob) -> None:
        """Queue a validated step of ``job.session``; it runs after that session's earlier steps."""
        session = job.session
        if session.ended:
            return
        session.pending.append(job)
        session.queued_ids.add(job.step_id)
        self._queued[session] = None
        self._wake.set()

    def drop(self, session: Session) -> None:
        """Forget a session's queued steps (it ended); a step in progress is discarded when done."""
        session.pending.clear()
        session.queued_ids.clear()
        self._queued.pop(session, None)

    @property
    def queued_steps(self) -> int:
        return sum(len(s.pending) for s in self._queued)

    # ---- the loop ----------------------------------------------------------------------------

    def schedule(self) -> list[StepJob]:
        """The steps of the next turn: one step, decode before prefill, oldest first."""
        ready = [s for s in self._queued if s.pending and not s.busy]
        if not ready:
            return []
        decode = [s for s in ready if s.pending[0].tokens == 1]
        session = min(decode or ready, key=lambda s: s.pending[0].arrived)
        job = session.pending.popleft()
        if not session.pending:
            self._queued.pop(session, None)
        return [job]

    def execute(self, jobs: list[StepJob]) -> list[Result]:
        """Run ``jobs`` through their spans (on the compute thread); one result per job."""
        results: list[Result] = []
        with torch.inference_mode():
            for job in jobs:
                try:
                    results.append((self._run_one(job), None))
                except Exception as err:
                    if not isinstance(err, MeshinferError):
                        log.exception("step %d of session %s failed", job.step_id, job.session.session_id)
                    results.append((None, _as_session_error(err)))
        return results

    def _run_one(self, job: StepJob) -> Tensor:
        session = job.session
        cache: KVCache | None = session.cache
        if cache is None or session.ended:
            raise SessionError(ErrorCode.UNKNOWN_SESSION, f"session {session.session_id!r} has ended")
        if job.position > cache.length:
            raise SessionError(
                ErrorCode.BAD_REQUEST,
                f"step {job.step_id} starts at position {job.position} but the session holds only "
                f"{cache.length} tokens (send the missing tokens first)",
            )
        if job.position < cache.length:
            cache.truncate(job.position)  # replay or rewind: forget what follows
        started = time.monotonic()
        hidden = decode_tensor(job.hidden, self._limits)  # [T, H]
        out = self._sub_spans[session.span](hidden.unsqueeze(0), cache)  # [1, T, H]
        result = encode_tensor(out[0].to(torch_dtype(session.dtype)))  # [T, H]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step %d of session %s: %d token(s) at position %d, queued %.2f ms, computed in %.2f ms",
                      job.step_id, session.session_id, job.tokens, job.position,
                      (started - job.arrived) * 1000, (time.monotonic() - started) * 1000)
        return result

    def deliver(self, jobs: list[StepJob], results: list[Result]) -> None:
        """Record each result on its session and hand it to the deliver callback (non-blocking)."""
        now = time.monotonic()
        for job, (output, error) in zip(jobs, results, strict=True):
            session = job.session
            session.busy = False
            session.queued_ids.discard(job.step_id)
            if session.ended:
                continue
            session.last_activity = now
            if output is not None:
                session.last_step_id, session.last_output = job.step_id, output
                self.steps_done += 1
                self.tokens_done += job.tokens
            try:
                self._deliver(job, output, error)
            except Exception:
                log.exception("delivering step %d of session %s failed", job.step_id, session.session_id)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = self.schedule()
            if not jobs:
                self._wake.clear()
                await self._wake.wait()
                continue
            for job in jobs:
                job.session.busy = True
            try:
                results = await loop.run_in_executor(self._executor, self.execute, jobs)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the executor itself failed: report, keep serving
                log.exception("step loop turn failed")
                results = [(None, _as_session_error(err))] * len(jobs)
            self.deliver(jobs, results)
