"""The pure step scheduler (``server.scheduler``): batching policy, chunked prefill, limits, bursts, drops and
errors, in milliseconds (no torch, no event loop, no network: wire tensors carry only their shape here)."""

from __future__ import annotations

import pytest
from scheduler_helpers import job, make_session, ok

from meshinfer.errors import ConfigError
from meshinfer.server.scheduler import Finished, Result, Scheduler
from meshinfer.server.session import Session, SessionError
from meshinfer.wire.messages import Burst, ErrorCode


def _session(sid: str) -> Session:
    return make_session(sid)


def _turns(scheduler: Scheduler, now: float = 100.0) -> list[list[tuple[str, int, int, int]]]:
    """Run turns (every piece succeeds) until nothing is ready; each as (session, step id, start, count)."""
    turns = []
    while pieces := scheduler.schedule(now):
        turns.append([(p.job.session.session_id, p.job.step_id, p.start, p.count) for p in pieces])
        scheduler.update(pieces, [ok(p) for p in pieces], now)
    return turns


def test_decode_first_oldest_first_one_step_per_session() -> None:
    s = Scheduler()
    a, b, c = (_session(x) for x in "abc")
    s.submit(job(a, 0, 5, 1.0))  # prefill, oldest
    s.submit(job(a, 1, 1, 2.0))  # decode, but behind a's prefill
    s.submit(job(c, 0, 1, 4.0))  # decode, newer
    s.submit(job(b, 0, 1, 3.0))  # decode
    assert s.queued_steps == 4 and s.queued_sessions == 3
    assert _turns(s) == [[("b", 0, 0, 1), ("c", 0, 0, 1), ("a", 0, 0, 5)], [("a", 1, 0, 1)]]
    assert s.queued_steps == 0 and s.queued_sessions == 0
    assert (s.steps_done, s.tokens_done) == (4, 8)
    assert a.last_step_id == 1 and a.idle and not a.queued_ids


def test_long_prefill_is_chunked_and_decode_never_waits() -> None:
    s = Scheduler(max_batch_tokens=4)
    a, b = _session("a"), _session("b")
    s.submit(job(a, 0, 10, 1.0))
    for i in range(3):
        s.submit(job(b, i, 1, 2.0 + i))
        turn = s.schedule(100.0)
        assert [(p.job.session.session_id, p.start, p.count) for p in turn] == [("b", 0, 1), ("a", 3 * i, 3)]
        assert a.busy and b.busy
        finished = s.update(turn, [ok(p) for p in turn], 100.0)
        assert [(f.job.session.session_id, f.job.step_id) for f in finished] == [("b", i)]  # a is not done
        assert a.pending[0].done == 3 * (i + 1) and not a.busy
    assert _turns(s) == [[("a", 0, 9, 1)]]  # the last chunk
    assert a.last_step_id == 0 and s.tokens_done == 13


def test_the_oldest_prefill_progresses_when_nothing_else_fits() -> None:
    s = Scheduler(max_batch_tokens=4)
    a, b = _session("a"), _session("b")
    s.submit(job(a, 0, 6, 1.0))
    s.submit(job(b, 0, 6, 2.0))
    # a takes the whole budget; b waits rather than taking nothing; a's last 2 tokens leave room for b.
    assert _turns(s) == [[("a", 0, 0, 4)], [("a", 0, 4, 2), ("b", 0, 0, 2)], [("b", 0, 2, 4)]]


def test_session_limit_per_turn() -> None:
    s = Scheduler(max_batch_sessions=2)
    sessions = [_session(f"s{i}") for i in range(5)]
    for i, session in enumerate(sessions):
        s.submit(job(session, 0, 1 if i < 3 else 2, float(i)))
    assert [[x[0] for x in turn] for turn in _turns(s)] == [["s0", "s1"], ["s2", "s3"], ["s4"]]


def test_busy_sessions_are_not_scheduled_twice() -> None:
    s = Scheduler()
    a = _session("a")
    s.submit(job(a, 0, 1, 1.0))
    s.submit(job(a, 1, 1, 2.0))
    turn = s.schedule(100.0)
    assert len(turn) == 1 and s.schedule(100.0) == []  # a's second step waits for its first
    s.update(turn, [ok(p) for p in turn], 100.0)
    assert [p.job.step_id for p in s.schedule(100.0)] == [1]


def test_bursts_are_held_until_complete_or_their_hold_ends() -> None:
    s = Scheduler(burst_hold_s=1.0)
    a, b, c = (_session(x) for x in "abc")
    tag = Burst(id=7, size=2)
    s.submit(job(a, 0, 1, 10.0, burst=tag))
    s.submit(job(c, 0, 1, 10.0))  # untagged: never held
    assert _turns(s, now=10.1) == [[("c", 0, 0, 1)]]
    assert s.deadline(10.1) == pytest.approx(11.0)
    s.submit(job(b, 0, 1, 10.2, burst=tag))
    assert _turns(s, now=10.2) == [[("a", 0, 0, 1), ("b", 0, 0, 1)]]
    s.submit(job(a, 1, 1, 20.0, burst=Burst(id=8, size=3)))  # the rest never comes
    assert s.schedule(20.5) == []
    assert _turns(s, now=21.5) == [[("a", 1, 0, 1)]]
    assert s.deadline(30.0) is None  # nothing queued


def test_drop_mid_prefill_forgets_the_step_and_its_progress() -> None:
    s = Scheduler(max_batch_tokens=4)
    a, b = _session("a"), _session("b")
    s.submit(job(a, 0, 10, 1.0))
    s.submit(job(a, 1, 1, 2.0))
    s.submit(job(b, 0, 1, 3.0))
    turn = s.schedule(100.0)  # b's decode and a's first chunk
    a.ended = True
    s.drop(a)  # while its chunk is being computed
    assert not a.pending and not a.queued_ids and s.queued_sessions == 1
    finished = s.update(turn, [ok(p) for p in turn], 100.0)
    assert [f.job.session.session_id for f in finished] == ["b"]
    assert s.queued_sessions == 0 and not a.busy and a.last_step_id is None
    assert not s.submit(job(a, 2, 1, 4.0))  # an ended session queues nothing
    assert s.schedule(100.0) == []


def test_a_failed_step_is_finished_with_its_error_and_the_others_go_on() -> None:
    s = Scheduler(max_batch_tokens=4)
    a, b = _session("a"), _session("b")
    s.submit(job(a, 0, 10, 1.0))
    s.submit(job(a, 1, 1, 2.0))
    s.submit(job(b, 0, 1, 3.0))
    turn = s.schedule(100.0)
    error = SessionError(ErrorCode.BAD_REQUEST, "bad")
    outcomes = [Result(error=error) if p.job.session is a else ok(p) for p in turn]
    finished = s.update(turn, outcomes, 100.0)
    assert [(f.job.session.session_id, f.job.step_id, f.output is None, f.error) for f in finished] == [
        ("b", 0, False, None), ("a", 0, True, error)]
    assert isinstance(finished[0], Finished) and a.last_step_id is None and s.steps_done == 1
    assert a.queued_ids == {1} and _turns(s) == [[("a", 1, 0, 1)]]  # a's next step still runs


def test_limits_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        Scheduler(max_batch_tokens=0)
    with pytest.raises(ConfigError):
        Scheduler(max_batch_sessions=0)
