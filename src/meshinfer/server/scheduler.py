"""The step loop's pure half: which pieces of which steps run next turn, and what a turn's outcomes change.

Contract (schedule -> execute -> update, as in vLLM v1): ``Scheduler`` keeps the sessions with queued
steps in arrival order and, each turn,

- ``schedule(now)`` picks the turn's ``Piece``s: at most one step per session (a session's steps run in
  order), every waiting decode step (1 token) first, up to ``max_batch_sessions``; then prefill steps
  while the turn's token budget (``max_batch_tokens``) lasts. Fair across peers (``Session.client``, the
  peer that opened the session): decode slots are dealt round-robin over the peers with ready steps,
  starting with the peer served least recently, and the prefill budget is shared max-min fairly
  (each peer gets an equal share, what one peer does not need goes to the others); within one peer,
  oldest first. So a peer with many queued steps cannot starve another. While more than one peer is
  active (stepped within ``active_window_s``), a turn computes at most ``shared_batch_tokens`` prefill tokens,
  and a turn with decode steps right after a prefill turn takes decode steps only: one peer's long prompts
  then delay another's decode step by about one short turn, not one full one. A prefill
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

With credits (``credit``: peer id -> its credit in block-tokens, issue 23), decode slots are dealt by weighted
fair queueing instead: a peer's weight is ``ledger.priority.weight(credit)`` (1 without credit, up to
``PriorityPolicy.max_weight``), and over turns peers get slots in proportion to their weights, so under
contention a contributor's sessions step more often and wait less, while every peer with ready steps keeps
getting slots (nobody starves: at worst 1 of every ``max_weight`` + 1 slots two peers compete for).

``drop(session)`` forgets an ended session's queued steps (a step being computed is discarded when its
turn is done). ``queued_for(peer)`` counts the steps a peer's sessions have waiting (for the per-peer
limit). Free of torch, of asyncio and of the network; no clock of its own (callers pass ``now``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshinfer.errors import ConfigError
from meshinfer.ledger.priority import PriorityPolicy, weight
from meshinfer.server.session import Session, SessionError, StepJob
from meshinfer.wire.burst import BURST_HOLD_S, BurstTracker
from meshinfer.wire.tensor import Tensor

MAX_BATCH_TOKENS = 512
"""Tokens one turn may compute (decode steps count one each); longer prefills are chunked."""
MAX_BATCH_SESSIONS = 64
"""Sessions one turn may serve."""
SHARED_BATCH_TOKENS = 64
"""Prefill tokens one turn may compute while several peers are active (so no peer's decode step waits behind
another peer's long prefill turn)."""
ACTIVE_WINDOW_S = 1.0
"""A peer counts as active for this long after its last step arrived."""


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
                 burst_hold_s: float = BURST_HOLD_S, shared_batch_tokens: int = SHARED_BATCH_TOKENS,
                 active_window_s: float = ACTIVE_WINDOW_S, credit: Callable[[str], int] | None = None,
                 priority: PriorityPolicy | None = None) -> None:
        if max_batch_tokens <= 0 or max_batch_sessions <= 0 or shared_batch_tokens <= 0:
            raise ConfigError("max_batch_tokens, max_batch_sessions and shared_batch_tokens must be > 0")
        self.shared_batch_tokens = shared_batch_tokens
        self.credit = credit
        """Peer id -> its credit (block-tokens served minus used); None: plain round-robin fairness."""
        self.priority = priority or PriorityPolicy()
        self._vservice: dict[str, float] = {}  # peer -> decode slots taken / its weight (weighted fair queueing)
        self.active_window_s = active_window_s
        self._active: dict[str, float] = {}  # peer -> when its latest step arrived
        self._prefilled = False  # the last turn computed prefill tokens
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_sessions = max_batch_sessions
        self._bursts = BurstTracker(burst_hold_s)
        self._queued: dict[Session, None] = {}  # sessions with pending steps, in arrival order
        self._peer_steps: dict[str, int] = {}  # peer -> steps its sessions have pending
        self._served: dict[str, int] = {}  # peer -> when it was last served (a counter: round-robin order)
        self._serial = 0
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
        self._peer_steps[session.client] = self._peer_steps.get(session.client, 0) + 1
        self._active[session.client] = max(job.arrived, self._active.get(session.client, job.arrived))
        self._bursts.arrived(job.burst, job.arrived)
        self._queued[session] = None
        return True

    def drop(self, session: Session) -> None:
        """Forget a session's queued steps (it ended); a step in progress is discarded when done."""
        self._count(session.client, -len(session.pending))
        session.pending.clear()
        session.queued_ids.clear()
        self._queued.pop(session, None)

    def clear(self) -> None:
        """Forget every queued session (the loop stops)."""
        self._queued.clear()
        self._peer_steps.clear()

    def _count(self, peer: str, delta: int) -> None:
        n = self._peer_steps.get(peer, 0) + delta
        if n > 0:
            self._peer_steps[peer] = n
        else:
            self._peer_steps.pop(peer, None)

    def queued_for(self, peer: str) -> int:
        """Steps the sessions of ``peer`` have waiting or being computed."""
        return self._peer_steps.get(peer, 0)

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
        peers: dict[str, list[Session]] = {}
        for session in ready:  # each peer's sessions, oldest first
            peers.setdefault(session.client, []).append(session)
        order = sorted(peers, key=lambda p: self._served.get(p, -1))  # least recently served first (stable)
        pieces: list[Piece] = []
        decodes = [[s for s in peers[p] if s.pending[0].tokens == 1] for p in order]
        if self.credit is None:
            for column in range(max((len(d) for d in decodes), default=0)):  # decode steps first, round-robin
                for peer_decodes in decodes:
                    if column < len(peer_decodes) and len(pieces) < self.max_batch_sessions:
                        pieces.append(Piece(peer_decodes[column].pending[0], 0, 1))
        else:
            pieces = self._weighted_decodes(order, decodes, self.credit)
        budget = self.max_batch_tokens - len(pieces)
        if self._contended(now):  # several peers: short prefill turns, and never two in a row before decodes
            budget = 0 if pieces and self._prefilled else min(budget, self.shared_batch_tokens)
        prefills = {p: [s for s in peers[p] if s.pending[0].tokens > 1] for p in order}
        demand = {p: sum(s.pending[0].tokens - s.pending[0].done for s in ss) for p, ss in prefills.items() if ss}
        shares = fair_shares(max(budget, 0), demand)
        for peer in order:  # then prefill (or its next chunk): each peer within its share, oldest first
            share = shares.get(peer, 0)
            for session in prefills[peer]:
                if len(pieces) >= self.max_batch_sessions or share <= 0:
                    break
                job = session.pending[0]
                take = min(job.tokens - job.done, share)
                pieces.append(Piece(job, job.done, take))
                share -= take
        if not pieces:  # nothing else fits: the oldest prefill still progresses
            job = ready[0].pending[0]
            pieces.append(Piece(job, job.done, min(job.tokens - job.done, self.max_batch_tokens)))
        self._prefilled = any(p.job.tokens > 1 for p in pieces)
        for piece in pieces:
            piece.job.session.busy = True
            self._serial += 1
            self._served[piece.job.session.client] = self._serial
        if len(self._served) > 4 * len(peers) + 64:  # forget peers long gone (bounded memory)
            self._served = {p: t for p, t in self._served.items() if p in self._peer_steps}
        return pieces

    def _weighted_decodes(self, order: list[str], decodes: list[list[Session]],
                          credit: Callable[[str], int]) -> list[Piece]:
        """Decode slots by weighted fair queueing over peers: each slot goes to the peer with the least service
        so far (slots taken / its credit weight; a peer new to the queue starts level with the least served),
        so over turns peers get slots in proportion to their weights and every peer keeps getting some."""
        live = {p: d for p, d in zip(order, decodes, strict=True) if d}
        if not live:
            return []
        floor = min((self._vservice[p] for p in live if p in self._vservice), default=0.0)
        for p in live:
            self._vservice[p] = max(self._vservice.get(p, floor), floor)
        weights = {p: weight(credit(p), self.priority) for p in live}
        taken = dict.fromkeys(live, 0)
        rank = {p: i for i, p in enumerate(order)}
        pieces: list[Piece] = []
        while len(pieces) < self.max_batch_sessions:
            waiting = [p for p in live if taken[p] < len(live[p])]
            if not waiting:
                break
            peer = min(waiting, key=lambda p: (self._vservice[p], rank[p]))
            pieces.append(Piece(live[peer][taken[peer]].pending[0], 0, 1))
            taken[peer] += 1
            self._vservice[peer] += 1.0 / weights[peer]
        if len(self._vservice) > 4 * len(live) + 64:  # forget peers long gone (bounded memory)
            self._vservice = {p: v for p, v in self._vservice.items() if p in self._peer_steps}
        return pieces

    def _contended(self, now: float) -> bool:
        """Whether more than one peer stepped within the active window (forgets the others)."""
        horizon = now - self.active_window_s
        if len(self._active) > 1:
            self._active = {p: t for p, t in self._active.items() if t >= horizon}
        return len(self._active) > 1

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
                self._count(session.client, -1)
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


def fair_shares(budget: int, demand: dict[str, int]) -> dict[str, int]:
    """Max-min fair split of ``budget`` tokens over peers wanting ``demand`` tokens each: every peer gets an
    equal share, a peer wanting less gets what it wants and the rest is shared among the others (in the
    dict's order, the first peers get the remainder of an uneven split)."""
    shares: dict[str, int] = {}
    left, waiting = budget, sorted(demand, key=lambda p: demand[p])
    while waiting and left > 0:
        even = left // len(waiting)
        small = [p for p in waiting if demand[p] <= even]
        if not small:  # everyone wants more than an even share: split what is left
            extra = left - even * len(waiting)
            for p in demand:
                if p in waiting and even + (extra > 0) > 0:
                    shares[p] = even + (extra > 0)
                    extra -= 1
            return shares
        for p in small:
            shares[p] = demand[p]
            left -= demand[p]
        waiting = [p for p in waiting if p not in small]
    return shares
