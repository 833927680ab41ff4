"""Burst tags (pure): what a receiver holds, for how long, and how the tag travels on the wire."""

from __future__ import annotations

import msgspec
import pytest
import torch

from meshinfer.errors import WireError
from meshinfer.wire.burst import BurstTracker, new_burst
from meshinfer.wire.messages import MAX_BURST, Burst, Step, StepResult, decode_message, encode_message
from meshinfer.wire.tensor import encode_tensor


def test_new_burst_tags_only_real_batches() -> None:
    assert new_burst(0) is None and new_burst(1) is None
    a, b = new_burst(3), new_burst(3)
    assert a is not None and b is not None and a.size == 3 and a.id != b.id
    assert new_burst(MAX_BURST + 10).size == MAX_BURST  # type: ignore[union-attr]


def test_members_are_held_until_the_burst_is_complete() -> None:
    t = BurstTracker(hold_s=0.01)
    burst = Burst(id=7, size=3)
    t.arrived(burst, 100.0)
    assert t.held(burst, 100.0) and t.deadline(100.0) == pytest.approx(100.01)
    t.arrived(burst, 100.001)
    assert t.held(burst, 100.002)
    t.arrived(burst, 100.003)  # the last member: nobody waits any more
    assert not t.held(burst, 100.003) and t.deadline(100.003) is None and len(t) == 0


def test_an_incomplete_burst_is_held_at_most_hold_s() -> None:
    t = BurstTracker(hold_s=0.01)
    burst = Burst(id=1, size=4)
    t.arrived(burst, 5.0)
    assert t.held(burst, 5.009)
    assert not t.held(burst, 5.0101) and t.deadline(5.0101) is None  # a lost member costs the others hold_s once


def test_untagged_and_unknown_messages_never_wait() -> None:
    t = BurstTracker()
    t.arrived(None, 0.0)
    assert not t.held(None, 0.0) and not t.held(Burst(id=3, size=2), 0.0) and len(t) == 0


def test_deadline_is_the_earliest_held_burst() -> None:
    t = BurstTracker(hold_s=0.01)
    t.arrived(Burst(id=1, size=2), 1.000)
    t.arrived(Burst(id=2, size=2), 1.004)
    assert t.deadline(1.005) == pytest.approx(1.010)
    assert t.deadline(1.011) == pytest.approx(1.014)


def test_the_tracker_stays_small_whatever_senders_do() -> None:
    t = BurstTracker(hold_s=0.01, max_entries=50)
    for i in range(1000):  # never completed
        t.arrived(Burst(id=i, size=9), 0.0)
    assert len(t) <= 50
    t.arrived(Burst(id=5000, size=9), 1.0)  # long after: the stale ones are dropped
    assert len(t) == 1


def _step(burst: Burst | None = None) -> Step:
    return Step(session_id="s", step_id=1, position=2, hidden=encode_tensor(torch.zeros(1, 4)), burst=burst)


def test_the_tag_round_trips_and_is_optional() -> None:
    tag = Burst(id=2**63 - 1, size=16)
    msg = decode_message(encode_message(_step(tag)))
    assert isinstance(msg, Step) and msg.burst == tag
    assert decode_message(encode_message(_step())).burst is None  # type: ignore[union-attr]
    result = StepResult(session_id="s", step_id=1, hidden=encode_tensor(torch.zeros(1, 4)), burst=tag)
    assert decode_message(encode_message(result)) == result
    # a peer that does not know bursts sends no field at all: still a valid step
    raw = msgspec.msgpack.decode(encode_message(_step()))
    del raw["burst"]
    assert decode_message(msgspec.msgpack.encode(raw)).burst is None  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [{"id": -1, "size": 2}, {"id": 2**63, "size": 2}, {"id": 1, "size": 1},
                                 {"id": 1, "size": MAX_BURST + 1}, {"id": "x", "size": 2}, [1, 2]])
def test_bad_tags_are_malformed_messages(bad: object) -> None:
    raw = msgspec.msgpack.decode(encode_message(_step()))
    raw["burst"] = bad
    with pytest.raises(WireError, match="malformed"):
        decode_message(msgspec.msgpack.encode(raw))
