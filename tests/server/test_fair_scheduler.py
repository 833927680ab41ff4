"""Fair scheduling across peers (``server.scheduler``): round-robin decode slots, max-min fair prefill budget,
per-peer queued-step counts; pure and in milliseconds (no torch, no event loop, no network)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from scheduler_helpers import job, make_session, ok

from fuzzing import budget
from meshinfer.server.scheduler import Piece, Scheduler, fair_shares
from meshinfer.server.session import Session


def _session(sid: str, peer: str) -> Session:
    return make_session(sid, max_length=4096, peer=peer)


def _turn(s: Scheduler, now: float = 100.0) -> list[Piece]:
    pieces = s.schedule(now)
    s.update(pieces, [ok(p) for p in pieces], now)
    return pieces


def test_a_greedy_peers_decode_steps_cannot_crowd_out_another_peer() -> None:
    s = Scheduler(max_batch_sessions=4)
    greedy = [_session(f"g{i}", "greedy") for i in range(20)]
    for i, g in enumerate(greedy):  # all older than the victim's step
        for k in range(3):
            s.submit(job(g, k, 1, float(i)))
    victim = _session("v", "victim")
    for k in range(10):
        s.submit(job(victim, k, 1, 1000.0))
        pieces = _turn(s)
        assert "v" in [p.job.session.session_id for p in pieces]  # served every turn, not after 15 turns
        assert len(pieces) == 4
    assert s.queued_for("victim") == 0 and s.queued_for("greedy") == 60 - 30


def test_round_robin_rotates_when_slots_are_scarce() -> None:
    s = Scheduler(max_batch_sessions=2)
    for peer in "abc":
        for i in range(2):
            sess = _session(f"{peer}{i}", peer)
            for k in range(4):
                s.submit(job(sess, k, 1, 0.0))
    served = [sorted({p.job.session.client for p in _turn(s)}) for _ in range(6)]
    counts = {peer: sum(peer in turn for turn in served) for peer in "abc"}
    assert counts == {"a": 4, "b": 4, "c": 4}, served  # each turn two different peers, all equally often


def test_prefill_budget_is_shared_between_peers() -> None:
    s = Scheduler(max_batch_tokens=512)
    for i in range(4):  # the greedy peer's long prompts arrive first
        s.submit(job(_session(f"g{i}", "greedy"), 0, 2000, float(i)))
    s.submit(job(_session("v", "victim"), 0, 300, 10.0))
    first = _turn(s)
    tokens = {peer: sum(p.count for p in first if p.job.session.client == peer) for peer in ("greedy", "victim")}
    assert tokens == {"greedy": 256, "victim": 256}
    second = _turn(s)  # the victim's last 44 tokens; the greedy peer gets the rest of the budget
    tokens = {peer: sum(p.count for p in second if p.job.session.client == peer) for peer in ("greedy", "victim")}
    assert tokens == {"greedy": 512 - 44, "victim": 44}


def test_one_peer_keeps_the_old_policy() -> None:
    s = Scheduler(max_batch_tokens=8)
    a, b = _session("a", "p"), _session("b", "p")
    s.submit(job(a, 0, 6, 1.0))
    s.submit(job(b, 0, 6, 2.0))
    assert [(p.job.session.session_id, p.start, p.count) for p in _turn(s)] == [("a", 0, 6), ("b", 0, 2)]
    assert [(p.job.session.session_id, p.start, p.count) for p in _turn(s)] == [("b", 2, 4)]


def test_queued_counts_follow_submit_update_and_drop() -> None:
    s = Scheduler()
    a, b = _session("a", "p"), _session("b", "q")
    for k in range(3):
        s.submit(job(a, k, 1, 0.0))
    s.submit(job(b, 0, 1, 0.0))
    assert (s.queued_for("p"), s.queued_for("q")) == (3, 1)
    pieces = s.schedule(1.0)
    s.drop(a)  # ends while its step is being computed
    s.update(pieces, [ok(p) for p in pieces], 1.0)
    assert (s.queued_for("p"), s.queued_for("q"), s.queued_steps) == (0, 0, 0)


def test_fair_shares_examples() -> None:
    assert fair_shares(512, {"a": 2000, "b": 300}) == {"a": 256, "b": 256}
    assert fair_shares(512, {"a": 2000, "b": 100}) == {"a": 412, "b": 100}
    assert fair_shares(10, {"a": 5, "b": 5, "c": 5}) == {"a": 4, "b": 3, "c": 3}
    assert fair_shares(2, {"a": 5, "b": 5, "c": 5}) == {"a": 1, "b": 1}
    assert fair_shares(0, {"a": 5}) == {}


@budget(200)
@given(st.integers(0, 4096), st.dictionaries(st.text(min_size=1, max_size=3), st.integers(1, 5000), max_size=8))
def test_fair_shares_are_max_min_fair(total: int, demand: dict[str, int]) -> None:
    shares = fair_shares(total, demand)
    assert sum(shares.values()) == min(total, sum(demand.values()))
    assert all(0 < shares[p] <= demand[p] for p in shares)
    unmet = [p for p in demand if shares.get(p, 0) < demand[p]]
    for p in unmet:  # nobody short of its demand gets less than anyone else's share (up to the remainder)
        assert all(shares.get(p, 0) >= v - 1 for v in shares.values())


def test_while_several_peers_are_active_prefill_turns_are_short_and_alternate_with_decodes() -> None:
    s = Scheduler(max_batch_tokens=512, shared_batch_tokens=64, active_window_s=1.0)
    greedy = [_session(f"g{i}", "greedy") for i in range(4)]
    for i, g in enumerate(greedy):
        s.submit(job(g, 0, 2000, 10.0 + i * 0.01))
    alone = s.schedule(10.5)  # one peer active: the whole budget
    assert sum(p.count for p in alone) == 512
    s.update(alone, [ok(p) for p in alone], 10.5)
    victim = _session("v", "victim")
    s.submit(job(victim, 0, 1, 10.6))
    first = s.schedule(10.6)  # right after a prefill turn: the victim's decode step alone
    assert [(p.job.session.session_id, p.count) for p in first] == [("v", 1)]
    s.update(first, [ok(p) for p in first], 10.6)
    second = s.schedule(10.7)  # the greedy peer goes on, in short turns while the victim is active
    assert sum(p.count for p in second) == 64 and all(p.job.session.client == "greedy" for p in second)
    s.update(second, [ok(p) for p in second], 10.7)
    s.submit(job(victim, 1, 1, 10.8))
    third = s.schedule(10.8)
    assert [(p.job.session.session_id, p.count) for p in third] == [("v", 1)]
    s.update(third, [ok(p) for p in third], 10.8)
    later = s.schedule(12.0)  # the victim went quiet: full turns again
    assert sum(p.count for p in later) == 512


@budget(100)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 700)), min_size=1, max_size=40),
       st.integers(1, 600), st.integers(1, 8), st.integers(1, 128))
def test_fuzz_every_turn_is_bounded_counts_add_up_and_everything_drains(
        steps: list[tuple[int, int, int]], max_tokens: int, max_sessions: int, shared: int) -> None:
    s = Scheduler(max_batch_tokens=max_tokens, max_batch_sessions=max_sessions, shared_batch_tokens=shared)
    sessions: dict[tuple[int, int], Session] = {}
    for i, (peer, sid, tokens) in enumerate(steps):
        session = sessions.setdefault((peer, sid), _session(f"{peer}.{sid}", f"peer{peer}"))
        s.submit(job(session, i, tokens, 100.0 + i * 0.001))
    total = sum(t for _, _, t in steps)
    now, turns = 100.1, 0
    while s.queued_steps:
        pieces = s.schedule(now)
        assert pieces and len(pieces) <= max_sessions
        assert len({id(p.job.session) for p in pieces}) == len(pieces)  # one step per session and turn
        prefill = sum(p.count for p in pieces if p.job.tokens > 1)
        assert prefill <= max_tokens
        assert sum(s.queued_for(f"peer{p}") for p in range(4)) == s.queued_steps
        s.update(pieces, [ok(p) for p in pieces], now)
        turns += 1
        assert turns <= total + len(steps)  # progress every turn
    assert all(s.queued_for(f"peer{p}") == 0 for p in range(4))


# ---- credits (issue 23) ----------------------------------------------------------------------------------------


def _credit_run(turns: int, credit: dict[str, int]) -> dict[str, list[float]]:
    """Two peers with 6 decode sessions each on a server that batches 4 sessions a turn; every finished step is
    followed by the session's next one. Each peer's waits (turn start - arrival)."""
    from meshinfer.ledger.priority import PriorityPolicy

    sched = Scheduler(max_batch_sessions=4, credit=lambda p: credit.get(p, 0), priority=PriorityPolicy(max_weight=3))
    waits: dict[str, list[float]] = {"rich": [], "poor": []}
    step = 0
    for peer in ("rich", "poor"):
        for i in range(6):
            step += 1
            sched.submit(job(make_session(f"{peer}{i}", peer=peer), step, 1, 0.0))
    now = 0.0
    for _ in range(turns):
        now += 0.1
        pieces = sched.schedule(now)
        for piece in pieces:
            waits[piece.job.session.client].append(now - piece.job.arrived)
        for finished in sched.update(pieces, [ok(p) for p in pieces], now):
            step += 1
            sched.submit(job(finished.job.session, step, 1, now))
    return waits


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def test_with_credits_a_contributor_waits_less_and_nobody_starves():
    waits = _credit_run(300, {"rich": 10**9, "poor": -10**6})
    assert _median(waits["rich"]) < _median(waits["poor"])
    assert len(waits["rich"]) == 3 * len(waits["poor"])  # 3 slots a round against 1 (max_weight 3) ...
    assert max(waits["poor"]) <= 0.6 + 1e-9  # ... and the freeloader's sessions are still stepped every few turns


def test_without_credits_or_with_equal_credits_peers_share_evenly():
    for credit in ({}, {"rich": 10**9, "poor": 10**9}):
        waits = _credit_run(300, credit)
        assert len(waits["rich"]) == len(waits["poor"])
