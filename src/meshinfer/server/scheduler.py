"""The step loop's pure half: which pieces of which steps run next turn, and what a turn's outcomes change.

Contract (schedule -> execute -> update, as in vLLM v1): ``Scheduler`` keeps the sessions with queued
steps in arrival order and, each turn,

- ``schedule(now)`` picks the turn's ``Piece``s: at most one step per session (a session's steps run in
  order), every waiting decode step (1 token) first, oldest first, up to ``max_batch_sessions``; then
  prefill steps, oldest first, while the turn's token budget (``max_batch_tokens``) lasts. A prefill
  longer than what is left of the budget runs as a chunk this turn and continues next turn (chunked
  prefill), so a long prompt never stalls the others' decode steps, and a turn always makes progress
  (decode steps are always taken, and the oldest prefill gets at least one chunk per turn when nothing
  else fits). A step that carries a burst tag (``wire.burst``) is held until the rest of its burst is in,
  at most the tracker's hold; other steps are not held back meanwhile. Scheduled sessions are ``busy``;
- the caller executes the pieces (``server.runtime``) into one outcome per piece: ``None`` when more
  chunks of that step are to come, else a ``Result`` (its output or its error);
- ``update(pieces, outcomes, now)`` advances each chunked step's progress (``StepJob.done``), takes
  finished steps off their session's queue, records the last step id and output on the session (for
  duplicate step ids) and returns the finished steps of live sessions as ``Finished``, in piece order.

``drop(session)`` forgets an ended session's queued steps (a step being computed is discarded when its
turn is done). Free of torch, of asyncio and of the network; no clock of its own (callers pass ``now``).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshinfer.errors import ConfigError
from meshinfer.server.session import Session, SessionError, StepJob
from meshinfer.wire.burst import BURST_HOLD_S, BurstTracker
from meshinfer.wire.tensor import Tensor

MAX_BATCH_TOKENS = 512
"""Tokens one turn may compute (decode steps count one each); longer prefills are chunked."""
MAX_BATCH_SESSIONS = 64
"""Sessions one turn may serve."""


@dataclass
class Piece:
    """Part of one step computed in one turn: tokens [start, start + count) of ``job``."""

    job: StepJob
    start: int
    count: int

    @property
    def last(self) -> bool:
        return self.start + self.count >= self.job.tokens


@dataclass(frozen=True)
class Result:
    """What a step came to once its last piece ran: its output (a wire tensor) or its error."""

    output: Tensor | None = None
    error: SessionError | None = None


@dataclass(frozen=True)
class Finished:
    """A finished step of a live session: its job and either its output or its error."""

    job: StepJob
    output: Tensor | None
    error: SessionError | None


class Scheduler:
    """The queue of every session's steps and the batching policy (see the module docstring)."""

    def __init__(self, *, max_batch_tokens: int = MAX_BATCH_TOKENS, max_batch_sessions: int = MAX_BATCH_SESSIONS,
                 burst_hold_s: float = BURST_HOLD_S) -> None:
        if max_batch_tokens <= 0 or max_batch_sessions <= 0:
            raise ConfigError("max_batch_tokens and max_batch_sessions must be > 0")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_sessions = max_batch_sessions
        self._bursts = BurstTracker(burst_hold_s)
        self._queued: dict[Session, None] = {}  # sessions with pending steps, in arrival order
        self.steps_done = 0
        self.tokens_done = 0

    # ---- queueing ----------------------------------------------------------------------------

    def submit(self, job: StepJob) -> bool:
        """Queue a validated step of ``job.session`` after that session's earlier steps; False (nothing
        queued) when the session has ended."""
        session = job.session
        if session.ended:
            return False
        session.pending.append(job)
        session.queued_ids.add(job.step_id)
        self._bursts.arrived(job.burst, job.arrived)
        self._queued[session] = None
        return True

    def drop(self, session: Session) -> None:
        """Forget a session's queued steps (it ended); a step in progress is discarded when done."""
        session.pending.clear()
        session.queued_ids.clear()
        self._queued.pop(session, None)

    def clear(self) -> None:
        """Forget every queued session (the loop stops)."""
        self._queued.clear()

    @property
    def queued_steps(self) -> int:
        return sum(len(s.pending) for s in self._queued)

    @property
    def queued_sessions(self) -> int:
        return len(self._queued)

    def deadline(self, now: float) -> float | None:
        """When a step held for the rest of its burst stops being held (None: nothing queued or held)."""
        return self._bursts.deadline(now) if self._queued else None

    # ---- schedule ----------------------------------------------------------------------------

    def schedule(self, now: float) -> list[Piece]:
        """The pieces of the next turn (see the module docstring for the policy); marks their sessions busy."""
        ready = [s for s in self._queued
                 if s.pending and not s.busy and not self._bursts.held(s.pending[0].burst, now)]
        if not ready:
            return []
        ready.sort(key=lambda s: s.pending[0].arrived)
        pieces: list[Piece] = []
        budget = self.max_batch_tokens
        for session in ready:  # decode steps first: latency-critical, one token each
            job = session.pending[0]
            if job.tokens == 1 and len(pieces) < self.max_batch_sessions:
                pieces.append(Piece(job, 0, 1))
                budget -= 1
        for session in ready:  # then prefill (or its next chunk), oldest first
            job = session.pending[0]
            if job.tokens == 1 or len(pieces) >= self.max_batch_sessions:
                continue
            left = job.tokens - job.done
            take = min(left, budget)
            if take <= 0:
                if pieces:
                    break
                take = min(left, self.max_batch_tokens)  # nothing else fits: the oldest still progresses
            pieces.append(Piece(job, job.done, take))
            budget -= take
        for piece in pieces:
            piece.job.session.busy = True
        return pieces

    # ---- update ------------------------------------------------------------------------------

    def update(self, pieces: list[Piece], outcomes: list[Result | None], now: float) -> list[Finished]:
        """Apply one turn's outcomes (one per piece); the finished steps of live sessions, in piece order."""
        finished: list[Finished] = []
        for piece, outcome in zip(pieces, outcomes, strict=True):
            job, session = piece.job, piece.job.session
            session.busy = False
            if outcome is None:  # more chunks to go: the step stays at the head of its session's queue
                job.done = piece.start + piece.count
                continue
            if session.pending and session.pending[0] is job:
                session.pending.popleft()
            if not session.pending:
                self._queued.pop(session, None)
            session.queued_ids.discard(job.step_id)
            if session.ended:
                continue
            session.last_activity = now
            if outcome.output is not None:
                session.last_step_id, session.last_output = job.step_id, outcome.output
                self.steps_done += 1
                self.tokens_done += job.tokens
            finished.append(Finished(job, outcome.output, outcome.error))
        return finished
