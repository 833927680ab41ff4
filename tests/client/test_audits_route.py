"""Audits on a two-hop route: a liar on the FIRST hop is caught and the rollback rewinds the honest hop after it.

Servers of the tiny llama: three of blocks 0:2 (the first dishonest: ``noise`` on half its steps) and one of 2:4.
The main route is steered to the liar (0:2) then the only 2:4 server, which no shadow can check (it is counted
unaudited). After a detection the session is rewound to the first bad position: the 2:4 server's cache holds
positions computed from the lie and must truncate them when the step at that position arrives. The greedy output
equals a ``LocalModel``'s.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_helpers import stop_swarm
from test_audits import LIAR, NEW, PROMPT, steer

from meshinfer.client.model import DistributedModel
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def route_swarm(bootstrap: list[str]) -> Iterator[LocalSwarm]:
    swarm = LocalSwarm(tiny_checkpoint("llama"), [(0, 2), (0, 2), (0, 2), (2, 4)], initial_peers=bootstrap,
                       startup_timeout=120, dishonest={0: LIAR}).start()
    try:
        yield swarm
    finally:
        stop_swarm(swarm)


def test_first_hop_liar_rolls_back_the_next_hop_too(route_swarm: LocalSwarm) -> None:
    model_dir = tiny_checkpoint("llama")
    liar, honest = route_swarm.servers[0].peer_id, [s.peer_id for s in route_swarm.servers[1:3]]
    last = route_swarm.servers[3].peer_id
    want = LocalModel.from_pretrained(model_dir).generate(PROMPT, NEW, stop_token_ids=())
    with DistributedModel.from_pretrained(model_dir, route_swarm.initial_peers, route_wait=2.0) as model:
        steer(model, honest, members=[s.peer_id for s in route_swarm.servers])
        got = model.generate(PROMPT, NEW, stop_token_ids=())
        assert [h.peer_id for h in model.last_route] == [liar, last]
        session = model.last_session
        assert session is not None
        counters = model.audits
    assert got == want
    assert counters.detections >= 1 and counters.peer(liar).failed >= 1, counters
    assert counters.peer(last).unaudited >= 1 and counters.peer(last).passed == 0, counters
    assert [h.peer_id for h in session.route][1] == last and session.route[0].peer_id in honest

