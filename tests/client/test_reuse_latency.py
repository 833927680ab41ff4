"""Fewer trips per token through real server processes (issue 21 part 3): a near server and a far one (behind the
WAN relay, 50 ms each way) serve the same blocks. The client measures both before its first session (the dial's
round trip) and routes to the near one; later generations reuse the connections (no new dial) and give the local
engine's tokens; a refused Open, sent back to back with the first step, fails the step cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from client_helpers import stop_swarm

from meshinfer.bench.wan_relay import RelayProcess, free_port
from meshinfer.client.config import ClientConfig
from meshinfer.client.model import DistributedModel
from meshinfer.client.session import InferenceSession
from meshinfer.errors import RemoteError
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm
from meshinfer.wire.messages import ErrorCode

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 7, 99, 3]
NEW_TOKENS = 6
DELAY_MS = 50.0


@dataclass
class Setup:
    swarm: LocalSwarm
    client: DistributedModel
    near: str
    far: str
    reference: list[int]


@pytest.fixture(scope="module")
def setup(meshinfer_cache_dir: Path, bootstrap: list[str]) -> Iterator[Setup]:
    model_dir = tiny_checkpoint("llama", seed=321)  # its own model id: no stale records of other tests' servers
    reference = LocalModel.from_pretrained(model_dir).generate(PROMPT, NEW_TOKENS, stop_token_ids=())
    with RelayProcess() as relay:
        swarm = LocalSwarm(model_dir, [], initial_peers=bootstrap, startup_timeout=120).start()
        try:
            near = swarm.add_server((0, 4))
            port, dport = free_port(), free_port()
            far = swarm.add_server((0, 4), extra_args=[
                "--port", str(port), "--direct-port", str(dport), "--announce", f"127.0.0.1:{relay.listen(port)}",
                "--direct-announce", f"127.0.0.1:{relay.listen(dport)}"])
            relay.configure(DELAY_MS, 0.0)
            client = DistributedModel.from_pretrained(model_dir, swarm.initial_peers,
                                                      # DHT reads cross the 50 ms relay to the far server:
                                                      # generous bounds on a loaded 2-core machine
                                                      config=ClientConfig(audit=False, dht_timeout=20.0,
                                                                          route_wait=20.0))
            try:
                yield Setup(swarm, client, near.peer_id, far.peer_id, reference)
            finally:
                client.close()
        finally:
            stop_swarm(swarm)


def test_the_first_plan_measures_both_servers_and_picks_the_near_one(setup: Setup) -> None:
    client = setup.client
    assert client.view.stats.rtt() == {}  # nothing measured before the first plan
    route = client.plan()
    rtt = client.view.stats.rtt()
    assert set(rtt) == {setup.near, setup.far}  # the probe dialled both (a round trip each)
    assert rtt[setup.far] >= 2 * DELAY_MS / 1000 * 0.9 and rtt[setup.far] > rtt[setup.near]
    assert [h.peer_id for h in route] == [setup.near]
    picks = [client.plan()[0].peer_id for _ in range(10)]  # random spreading still favours the near one
    assert picks.count(setup.near) >= 9, picks


def test_later_generations_reuse_the_connections_and_keep_the_tokens(setup: Setup) -> None:
    client = setup.client
    node = client.view.node
    assert client.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == setup.reference
    dials, reused = node.direct_dials, node.reused_streams
    assert [h.peer_id for h in client.last_route] == [setup.near]
    for _ in range(2):
        assert client.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == setup.reference
    assert node.direct_dials == dials  # no new connection: each session took the one the last left
    assert node.reused_streams >= reused + 2


def test_a_refused_open_fails_its_first_step_cleanly_and_the_server_goes_on(setup: Setup) -> None:
    client = setup.client
    route = client.plan()

    async def refused() -> None:
        session = await InferenceSession.open(client.view.node, route, model_id="ab" * 32, max_length=16)
        try:
            with pytest.raises(RemoteError) as info:  # Open and the first step went back to back
                await session.step(torch.zeros(len(PROMPT), 64))
            assert info.value.code == ErrorCode.UNKNOWN_MODEL
        finally:
            await session.close()

    asyncio.run_coroutine_threadsafe(refused(), client.loop).result(timeout=60)
    assert client.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == setup.reference
