"""Fixtures for block-server tests: one swarm of real processes on 127.0.0.1 shared by the package.

``swarm``: a ``meshinfer dht`` bootstrap and three ``meshinfer serve`` processes on the tiny llama
checkpoint (4 blocks): ``full`` serves 0:4 (small KV budget, no per-peer limits below it, for admission and
bad-input tests),
``head`` serves 0:2 and ``tail`` serves 2:4 (for push routes). ``client`` is a client-mode peer in the
test process. Everything is started here and stopped here by PID; teardown checks that no ``p2pd``
any of them started is left running.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import (
    FULL_CACHE_TOKENS,
    FULL_MAX_SESSIONS,
    FULL_MAX_STEP_TOKENS,
    Client,
    Server,
    Swarm,
    start_servers,
    stop_and_check,
)

from meshinfer.testing.procs import start_dht


@pytest.fixture(scope="package")
def tiny_llama(meshinfer_cache_dir: Path) -> Path:
    from meshinfer.testing.checkpoints import tiny_checkpoint

    return tiny_checkpoint("llama")


@pytest.fixture(scope="package")
def swarm(tiny_llama: Path) -> Iterator[Swarm]:
    dht, bootstrap = start_dht(timeout=90)
    servers: list[Server] = []
    try:
        servers = start_servers(str(tiny_llama), [
            ("0:4", ["--cache-tokens", str(FULL_CACHE_TOKENS), "--max-sessions", str(FULL_MAX_SESSIONS),
                     "--max-step-tokens", str(FULL_MAX_STEP_TOKENS), "--public-name", "full-node",
                     # the admission tests fill the whole budget from one peer: no per-peer limits here
                     "--max-sessions-per-peer", str(FULL_MAX_SESSIONS), "--max-kv-tokens-per-peer", "1"]),
            ("0:2", []),
            ("2:4", []),
        ], bootstrap)
        yield Swarm(tiny_llama, dht, bootstrap, *servers)
    finally:
        procs = [s.proc for s in servers] + [dht]
        codes = stop_and_check(procs)
        bad = [f"{p.name} exited {code}:\n{p.stderr_tail(15)}" for p, code in zip(procs, codes, strict=True) if code]
        assert not bad, "\n".join(bad)


@pytest.fixture(scope="package")
def client(swarm: Swarm) -> Iterator[Client]:
    c = Client(swarm.bootstrap)
    try:
        yield c
    finally:
        c.close()
