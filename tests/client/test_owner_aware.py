"""Owner-aware serving with real processes: an owner's load started mid-generation makes a ``--when idle`` server
drain; the generation in flight fails over and ends with exactly the local engine's greedy tokens; the server's
CPU use falls below the threshold; it announces ``online`` again once the load ends."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from client_helpers import start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.models.engine import LocalModel
from meshinfer.p2p.announce import read_coverage
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 7, 99, 3]
NEW_TOKENS = 200
BUSY_SHARE = 0.8
OWNER = ("--when", "idle", "--busy-share", str(BUSY_SHARE), "--busy-for", "1", "--idle-for", "2",
         "--drain-timeout", "1")
BURNERS = 3  # more busy processes than this machine's 2 cores: the owner takes (nearly) all of the CPU


@pytest.fixture(scope="module")
def model_dir(meshinfer_cache_dir: Path) -> Path:
    return tiny_checkpoint("llama", seed=311)


@pytest.fixture(scope="module")
def swarm(model_dir: Path, bootstrap: list[str]) -> Iterator[LocalSwarm]:
    swarm = start_swarm(model_dir, [(0, 4)], bootstrap, server_args=("--drain-timeout", "1"))
    try:
        swarm.add_server((0, 4), extra_args=OWNER)  # the lent machine, started last (its start is its own load)
        yield swarm
    finally:
        stop_swarm(swarm)


def _burn() -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BURNERS)]


def _state(client: DistributedModel, model_id: str, peer_id: str) -> str | None:
    coro = read_coverage(client.view.node, model_id, 4, timeout=10)
    record = asyncio.run_coroutine_threadsafe(coro, client.loop).result(30).servers.get(peer_id)
    return None if record is None else record.state


def test_the_owner_takes_the_machine_back_without_changing_any_answer(swarm: LocalSwarm, model_dir: Path) -> None:
    plain, lent = swarm.servers
    reference = LocalModel.from_pretrained(model_dir).generate(PROMPT, NEW_TOKENS, stop_token_ids=())
    burners: list[subprocess.Popen[bytes]] = []
    try:
        with DistributedModel.from_pretrained(model_dir, swarm.initial_peers) as client:
            deadline = time.monotonic() + 90  # the test's own start-up (reference, client) may look like an owner
            while _state(client, swarm.model_id, lent.peer_id) != "online":
                assert time.monotonic() < deadline, "the lent server never served: the machine is busy"
                time.sleep(0.5)
            async def generate() -> list[int]:
                bans = client.view.bans
                for _ in range(5):  # route this session to the lent server: back off from the other one
                    bans.fail(plain.peer_id, time.monotonic())
                tokens: list[int] = []
                async for token in client.astream(PROMPT, NEW_TOKENS, stop_token_ids=()):
                    tokens.append(token)
                    if len(tokens) == 3:
                        assert client.last_session is not None
                        assert client.last_session.route[0].peer_id == lent.peer_id
                        bans.succeed(plain.peer_id)  # the failover may use it
                        burners.extend(_burn())
                    await asyncio.sleep(0.05)  # a slow reader: the generation outlasts the owner's detection
                return tokens

            started = time.monotonic()
            tokens = asyncio.run_coroutine_threadsafe(generate(), client.loop).result(180)
            assert tokens == reference
            session = client.last_session
            assert session is not None and [f.peer_id for f in session.failovers][:1] == [lent.peer_id], \
                session.failovers
            assert _state(client, swarm.model_id, lent.peer_id) == "draining"
            # the lent server gave the CPU back: measured over 2 s while the owner's load goes on
            tree = [psutil.Process(lent.pid), *psutil.Process(lent.pid).children(recursive=True)]
            for proc in tree:
                proc.cpu_percent(None)
            time.sleep(2.0)
            share = sum(proc.cpu_percent(None) for proc in tree) / 100 / (psutil.cpu_count() or 1)
            assert share < BUSY_SHARE / 4, f"the drained server still uses {share:.0%} of the CPU"
            assert time.monotonic() - started < 120
            for proc in burners:
                proc.kill()
            deadline = time.monotonic() + 60
            while _state(client, swarm.model_id, lent.peer_id) != "online":
                assert time.monotonic() < deadline, "the server did not come back once the owner's load ended"
                time.sleep(0.5)
            again = client.generate(PROMPT, 8, stop_token_ids=())
            assert again == reference[:8]
    finally:
        for proc in burners:
            proc.kill()
            proc.wait(10)
    assert lent.alive() and "giving the machine back" in lent.proc.stderr_tail()
