"""``bench.swarm_parts``: the pure split of a swarm token's extra time, and per-step means from readings."""

from __future__ import annotations

import pytest

from meshinfer.bench.swarm_parts import breakdown, per_step_ms
from meshinfer.errors import ConfigError


def test_per_step_ms_is_the_mean_between_two_readings() -> None:
    assert per_step_ms((1.0, 10), (1.5, 110)) == pytest.approx(5.0)
    assert per_step_ms((1.0, 10), (1.0, 10)) is None  # no step in between: no figure, not a division by zero


def test_breakdown_splits_the_gap_exactly() -> None:
    split = breakdown(swarm_ms=36.0, local_ms=30.0, route_ms=29.5, server_ms=[9.0, 9.5, 9.5], local_blocks_ms=24.0,
                      penalty_ms=0.8)
    assert split["gap_ms_per_token"] == pytest.approx(6.0)
    assert split["in_servers_ms_per_token"] == pytest.approx(28.0)
    assert split["between_servers_ms_per_token"] == pytest.approx(1.5)  # 29.5 in the route, 28 in the servers
    assert split["client_ms_per_token"] == pytest.approx(6.5)  # 36 per token, 29.5 of it in the route
    assert split["local_head_and_sampling_ms_per_token"] == pytest.approx(6.0)  # 30 locally, 24 in the blocks
    assert split["gap_servers_ms"] == pytest.approx(4.0)
    assert split["gap_network_ms"] == pytest.approx(1.5)
    assert split["gap_client_ms"] == pytest.approx(0.5)
    assert split["gap_servers_ms"] + split["gap_network_ms"] + split["gap_client_ms"] == pytest.approx(6.0)
    assert split["pauses_predict_ms"] == pytest.approx(2.4)  # 0.8 per stage, 3 stages
    assert "pauses_predict_ms" not in breakdown(swarm_ms=1, local_ms=1, route_ms=0.8, server_ms=[0.5],
                                                local_blocks_ms=0.5)


def test_breakdown_needs_a_server() -> None:
    with pytest.raises(ConfigError):
        breakdown(swarm_ms=1, local_ms=1, route_ms=1, server_ms=[], local_blocks_ms=1)
