"""Fixtures for client tests: one bootstrap peer shared by every swarm of the client test session.

Every process is started through ``meshinfer.testing`` helpers and stopped by PID at teardown;
teardown also checks that none of their children (``p2pd``) outlive them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_helpers import stop_and_check

from meshinfer.testing.procs import start_dht


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[list[str]]:
    """Multiaddrs of a ``meshinfer dht`` bootstrap peer shared by every swarm of the client tests."""
    dht, maddrs = start_dht(timeout=90)
    try:
        yield maddrs
    finally:
        stop_and_check([dht])
