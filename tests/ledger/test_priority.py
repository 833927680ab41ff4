"""The credit priority of a contended server: monotone in credit, bounded, and nobody starves."""

from __future__ import annotations

import pytest

from meshinfer.ledger.priority import PriorityPolicy, advance_s, virtual_arrival

POLICY = PriorityPolicy(max_advance_s=2.0, saturation=1_000_000, unit=1_000)


def test_no_credit_and_negative_credit_get_no_advance():
    assert advance_s(0, POLICY) == 0.0
    assert advance_s(-10**9, POLICY) == 0.0


def test_the_advance_grows_with_credit_and_saturates():
    values = [advance_s(c, POLICY) for c in (1, 100, 1_000, 10_000, 100_000, 1_000_000, 10**12)]
    assert values == sorted(values) and values[0] > 0
    assert values[-2] == pytest.approx(2.0) and values[-1] == 2.0


def test_a_step_that_waited_longer_than_the_bound_goes_first_whatever_the_credits():
    freeloader = virtual_arrival(100.0, -10**9, POLICY)
    rich = virtual_arrival(100.0 + POLICY.max_advance_s + 1e-3, 10**12, POLICY)
    assert freeloader < rich
    # within the bound the contributor goes first
    assert virtual_arrival(101.0, 10**12, POLICY) < virtual_arrival(100.0, 0, POLICY)


def test_a_bad_policy_is_refused():
    with pytest.raises(ValueError):
        PriorityPolicy(max_advance_s=-1)
