"""Fixtures for multi-process P2P tests: real ``meshinfer dht`` and test-peer processes on 127.0.0.1.

Every process is started here and stopped here by its PID; teardown also checks that nothing any of
them started (their ``p2pd``) is left running.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from swarm_helpers import Peer, Swarm, start_peers, stop_all

from meshinfer.testing.procs import start_dht


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    """A bootstrap ``meshinfer dht`` process plus three test peers joined through it."""
    dht, maddrs = start_dht(timeout=90)
    peers: list[Peer] = []
    try:
        peers = start_peers(maddrs, 3)
        yield Swarm(dht, maddrs, peers)
    finally:
        stop_all([p.proc for p in peers] + [dht])
