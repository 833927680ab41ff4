"""Fixtures for client tests: one bootstrap peer shared by every swarm of the client test session.

Every process is started through ``meshinfer.testing`` helpers and stopped by PID at teardown;
teardown also checks that none of their children (``p2pd``) outlive them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_helpers import stop_and_check, stop_swarm

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.dishonest import DishonestConfig
from meshinfer.testing.procs import start_dht
from meshinfer.testing.swarm import LocalSwarm


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[list[str]]:
    """Multiaddrs of a ``meshinfer dht`` bootstrap peer shared by every swarm of the client tests."""
    dht, maddrs = start_dht(timeout=90)
    try:
        yield maddrs
    finally:
        stop_and_check([dht])


@pytest.fixture(scope="module")
def liar_trio() -> Iterator[LocalSwarm]:
    """Three servers of the tiny llama's blocks 0:4, the first one always lying (``wrong``), per test module, on a
    DHT of their own: reports and audit tallies (kept for minutes under the model's keys) and the records of
    stopped servers from other modules would otherwise show in these modules' swarm tables and report checks."""
    dht, maddrs = start_dht(timeout=90)
    try:
        s = LocalSwarm(tiny_checkpoint("llama"), [(0, 4), (0, 4), (0, 4)], initial_peers=maddrs, startup_timeout=120,
                       dishonest={0: DishonestConfig("wrong", seed=1)}).start()
        try:
            yield s
        finally:
            stop_swarm(s)
    finally:
        stop_and_check([dht])
