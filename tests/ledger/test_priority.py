"""What credit buys on a contended server: monotone in credit, bounded, never below a newcomer's share."""

from __future__ import annotations

import pytest

from meshinfer.ledger.priority import PriorityPolicy, share, weight

POLICY = PriorityPolicy(max_weight=4, saturation=1_000_000, unit=1_000)


def test_no_credit_and_negative_credit_weigh_one():
    assert weight(0, POLICY) == 1 and weight(-10**9, POLICY) == 1 and share(-5, POLICY) == 0.0


def test_the_weight_grows_with_credit_and_saturates():
    values = [weight(c, POLICY) for c in (1, 1_000, 10_000, 100_000, 1_000_000, 10**12)]
    assert values == sorted(values) and values[0] == 1 and values[-1] == values[-2] == 4
    assert share(10**12, POLICY) == 1.0 and 0 < share(1_000, POLICY) < share(10_000, POLICY) < 1


def test_a_bad_policy_is_refused():
    with pytest.raises(ValueError):
        PriorityPolicy(max_weight=0)
