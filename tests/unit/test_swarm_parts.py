"""``bench.swarm_parts``: the pure split of a swarm token's extra time, and per-step means from readings."""

from __future__ import annotations

import pytest

from meshinfer.bench.swarm_parts import breakdown, per_step_ms
from meshinfer.errors import ConfigError


def test_per_step_ms_is_the_mean_between_two_readings() -> None:
    assert per_step_ms((1.0, 10), (1.5, 110)) == pytest.approx(5.0)
    assert per_step_ms((1.0, 10), (1.0, 10)) is None  # no step in between: no figure, not a division by zero


def test_breakdown_splits_the_gap_exactly() -> None:
    split = breakdown(swarm_ms=36.0, local_ms=30.0, server_ms=[9.0, 9.5, 9.5], local_blocks_ms=24.0,
                      penalty_ms=0.8)
    assert split["gap_ms_per_token"] == pytest.approx(6.0)
    assert split["in_servers_ms_per_token"] == pytest.approx(28.0)
    assert split["servers_over_local_blocks_ms"] == pytest.approx(4.0)  # 28 in servers vs 24 locally
    assert split["client_compute_ms_per_token"] == pytest.approx(6.0)  # head, sampling: done in both
    assert split["network_and_client_ms"] == pytest.approx(2.0)  # 36 - 28 - 6
    assert split["servers_over_local_blocks_ms"] + split["network_and_client_ms"] == pytest.approx(6.0)
    assert split["pauses_predict_ms"] == pytest.approx(2.4)  # 0.8 per stage, 3 stages
    assert "pauses_predict_ms" not in breakdown(swarm_ms=1, local_ms=1, server_ms=[0.5], local_blocks_ms=0.5)


def test_breakdown_needs_a_server() -> None:
    with pytest.raises(ConfigError):
        breakdown(swarm_ms=1, local_ms=1, server_ms=[], local_blocks_ms=1)
