"""Owner-aware serving, the pure part: schedules, the busy/idle hysteresis, --max-load threads."""

from __future__ import annotations

import pytest

from meshinfer.errors import ConfigError
from meshinfer.server.owner import OwnerGate, OwnerPolicy, parse_schedule, threads_for

MON, TUE, FRI, SAT, SUN = 0, 1, 4, 5, 6


def at(hh: int, mm: int = 0) -> int:
    return hh * 60 + mm


def test_a_window_across_midnight_belongs_to_the_day_it_opens():
    s = parse_schedule("mon-fri 18:00-08:00")
    assert s.allows(MON, at(18)) and s.allows(MON, at(23, 59)) and s.allows(TUE, at(7, 59))
    assert not s.allows(MON, at(8)) and not s.allows(MON, at(17, 59))
    assert s.allows(SAT, at(7)) and not s.allows(SAT, at(18))  # friday night runs into saturday morning
    assert not s.allows(MON, at(3))  # sunday night is not listed


def test_whole_days_day_ranges_that_wrap_and_several_windows():
    s = parse_schedule("Sat-Sun, mon 09:00-12:30")
    assert s.allows(SAT, at(0)) and s.allows(SUN, at(23, 59)) and not s.allows(FRI, at(12))
    assert s.allows(MON, at(9)) and s.allows(MON, at(12, 29)) and not s.allows(MON, at(12, 30))
    wrap = parse_schedule("fri-mon")
    assert [wrap.allows(d, at(12)) for d in range(7)] == [True, False, False, False, True, True, True]
    assert parse_schedule("22:00-24:00").allows(TUE, at(23, 59))
    assert parse_schedule("00:00-24:00").allows(TUE, at(0))


@pytest.mark.parametrize("bad", ["", "mon-xyz", "25:00-26:00", "09:00", "10:00-10:00", "mon tue wed",
                                 "09:00-10:00 11:00-12:00", "9:60-10:00", "24:00-02:00"])
def test_bad_schedules_are_one_line_errors_naming_the_flag(bad):
    with pytest.raises(ConfigError, match="--schedule"):
        parse_schedule(bad)


def test_idle_mode_yields_after_busy_for_and_returns_after_idle_for():
    gate = OwnerGate(OwnerPolicy(when="idle", busy_share=0.5, busy_for=3, idle_for=5))
    t = 0.0
    assert gate.observe(t, 0.9, MON, 0) == "serve"  # busy starts
    assert gate.observe(t + 1, 0.1, MON, 0) == "serve"  # a spike: the timer restarts
    for dt in (2, 3, 4):
        assert gate.observe(t + dt, 0.9, MON, 0) == "serve"
    assert gate.observe(t + 5, 0.9, MON, 0) == "yield" and "90%" in gate.reason
    assert gate.observe(t + 6, 0.2, MON, 0) == "yield"
    assert gate.observe(t + 10, 0.2, MON, 0) == "yield"
    assert gate.observe(t + 11, 0.2, MON, 0) == "serve" and "idle" in gate.reason


def test_a_gap_in_the_samples_restarts_the_timers():
    gate = OwnerGate(OwnerPolicy(when="idle", busy_for=3, idle_for=3, max_gap=2))
    gate.observe(0, 0.9, MON, 0)
    assert gate.observe(10, 0.9, MON, 0) == "serve"  # 10 s later, but nothing seen in between
    assert gate.observe(11, 0.9, MON, 0) == "serve"
    assert gate.observe(13, 0.9, MON, 0) == "yield"


def test_always_mode_ignores_load_but_the_schedule_rules():
    gate = OwnerGate(OwnerPolicy(when="always", schedule=parse_schedule("mon 09:00-17:00")))
    assert gate.observe(0, 1.0, MON, at(10)) == "serve"
    assert gate.observe(1, 0.0, MON, at(17)) == "yield" and gate.reason == "outside --schedule"
    assert gate.observe(2, 0.0, TUE, at(10)) == "yield"
    idle = OwnerGate(OwnerPolicy(when="idle", idle_for=60, schedule=parse_schedule("mon 09:00-17:00")))
    assert idle.observe(0, 0.0, SUN, at(10)) == "yield"
    assert idle.observe(1, 0.0, MON, at(9)) == "serve"  # the window opened on an idle machine: at once


def test_bad_policies_and_max_load_threads():
    with pytest.raises(ConfigError, match="--when"):
        OwnerPolicy(when="sometimes")
    with pytest.raises(ConfigError, match="--busy-share"):
        OwnerPolicy(busy_share=1.5)
    assert threads_for(0.5, 2) == 1 and threads_for(0.5, 16) == 8 and threads_for(0.01, 4) == 1
    assert threads_for(1.0, 3) == 3
    with pytest.raises(ConfigError, match="--max-load"):
        threads_for(0, 4)
