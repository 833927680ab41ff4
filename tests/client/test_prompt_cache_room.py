"""Held sessions give way at once when a server is full: one server per span, each with a small KV budget
(``--cache-tokens 600``: a peer may hold 300 tokens there, one session of the tiny model's whole 256-token context).
Each new conversation's ``Open`` is refused for room while the previous one is held; the client closes that held
session on the refusing server and opens again at once (``client.held_sessions.open_making_room``), instead of
failing over to servers that are not there (~31 s of replanning before this, measured) and only then dropping the
cache. Asserted on the client's counters and log, not on time: no failover was attempted, one held session closed
and one Open retried per conversation, the greedy tokens those of a local engine."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_helpers import start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

BODY = [5, 17, 42, 7, 99, 3, 11, 23] * 5
NEW = 4


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_checkpoint("llama", seed=1)  # 256 positions: each session of the cache reserves all of them


@pytest.fixture(scope="module")
def swarm(model_dir: Path, bootstrap: list[str]) -> Iterator[LocalSwarm]:
    swarm = start_swarm(model_dir, [(0, 2), (2, 4)], bootstrap, server_args=("--cache-tokens", "600"))
    try:
        yield swarm
    finally:
        stop_swarm(swarm)


def test_a_full_server_gets_room_from_held_sessions_at_once(swarm: LocalSwarm, model_dir: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    local = LocalModel.from_pretrained(model_dir)
    prompts = [[i + 1] * 3 + BODY for i in range(3)]
    with caplog.at_level(logging.INFO, logger="meshinfer.client"), \
            DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False,
                                             prompt_cache_sessions=8) as client:
        stats = client.prompt_cache.stats
        for i, prompt in enumerate(prompts):
            assert client.generate(prompt, NEW, stop_token_ids=()) == local.generate(prompt, NEW, stop_token_ids=())
            assert len(client.prompt_cache) == 1  # the new conversation is held; the previous one gave way
            assert (stats.room_closes, stats.open_retries) == (i, i)  # one held session closed, one Open retried
        assert stats.misses == 3 and stats.fallbacks == 0
        assert client.failovers_total == 0
        # (no assertion on meshinfer.client.recovery's log: on a loaded 2-core CI machine a slow step may trigger a
        # stall recovery unrelated to room; the counters above and below are what this feature guarantees)
        refused = [r.getMessage() for r in caplog.records if "refused a session for room" in r.getMessage()]
        assert len(refused) == 2 and all("overloaded" in m for m in refused)
        dropped = [r for r in caplog.records if "closing those, retrying" in r.getMessage()]
        assert dropped == []  # the slow path (drop every held session after a failed open) was not taken
