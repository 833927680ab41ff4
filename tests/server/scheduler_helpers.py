"""Helpers for the pure scheduler's unit tests: sessions that never send, step jobs of empty tensors, and the
outcome of a piece that succeeds."""

from __future__ import annotations

from fakes import NoOutbox
from meshinfer.server.scheduler import Piece, Result
from meshinfer.server.session import Session, StepJob
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Burst
from meshinfer.wire.tensor import Tensor

__all__ = ["NoOutbox", "make_session"]



def make_session(sid: str, *, max_length: int = 1024, peer: str | None = None) -> Session:
    """A session of blocks 0:4 (opened by ``peer`` when given)."""
    if peer is None:
        return Session(sid, BlockRange(0, 4), max_length, "float32", NoOutbox())
    return Session(sid, BlockRange(0, 4), max_length, "float32", NoOutbox(), client=peer)


def job(session: Session, step_id: int, tokens: int, arrived: float, burst: Burst | None = None) -> StepJob:
    """A step of ``tokens`` tokens (hidden size 8, no data: the scheduler never reads it)."""
    hidden = Tensor(dtype="float32", shape=[tokens, 8], data=b"")
    return StepJob(session, step_id, 0, hidden, arrived, burst=burst)


def ok(piece: Piece) -> Result | None:
    """The outcome of ``piece`` when it succeeds: an output for a step's last piece, else None (more to come)."""
    return Result(output=Tensor(dtype="float32", shape=[piece.job.tokens, 8], data=b"")) if piece.last else None
