"""Failover mid-generation through real server processes: SIGKILL, SIGTERM and SIGSTOP of a server on the
route, and a dead server still listed in the DHT at open. Each time the generation completes with exactly
the local engine's greedy tokens, and the session records what it replaced."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_helpers import start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm, ServerProcess

pytestmark = pytest.mark.slow

SPANS = [(0, 2), (0, 2), (2, 4), (2, 4)]  # two servers for every span
PROMPT = [5, 17, 42, 7, 99, 3]
NEW_TOKENS = 160  # long enough to outlast a SIGTERMed server's drain timeout (0.2 s) after the kill
DRAIN = ("--drain-timeout", "0.2")
KILL_AFTER = 6


_seeds = iter(range(100, 200))


@pytest.fixture
def model_dir(meshinfer_cache_dir: Path) -> Path:
    """A fresh tiny model per test (another seed, so another model id): records of servers killed by an
    earlier test, still in the shared bootstrap's DHT for their TTL, belong to other models."""
    return tiny_checkpoint("llama", seed=next(_seeds))


@pytest.fixture
def reference(model_dir: Path) -> list[int]:
    return LocalModel.from_pretrained(model_dir).generate(PROMPT, NEW_TOKENS, stop_token_ids=())


@pytest.fixture
def swarm(model_dir: Path, bootstrap: list[str]) -> Iterator[LocalSwarm]:
    swarm = start_swarm(model_dir, SPANS, bootstrap, server_args=DRAIN)
    try:
        yield swarm
    finally:
        for server in swarm.servers:  # a stopped (SIGSTOP) server would ignore SIGTERM: wake it first
            if server.alive():
                server.proc.kill(signal.SIGCONT)
        stop_swarm(swarm)


def _server(swarm: LocalSwarm, peer_id: str) -> ServerProcess:
    return next(s for s in swarm.servers if s.peer_id == peer_id)


def _generate_and_hit(client: DistributedModel, swarm: LocalSwarm, hop: int, sig: int) -> tuple[list[int], str]:
    """Generate greedily; after KILL_AFTER tokens send ``sig`` to the server at route hop ``hop``; the tokens and
    the peer id of the server hit."""
    tokens: list[int] = []
    victim = ""
    for token in client.stream(PROMPT, NEW_TOKENS, stop_token_ids=()):
        tokens.append(token)
        if len(tokens) == KILL_AFTER:
            assert client.last_session is not None
            victim = client.last_session.route[hop].peer_id  # routes are spread at random: the one this session took
            _server(swarm, victim).proc.kill(sig)
    return tokens, victim


@pytest.mark.parametrize(("sig", "hop"), [(signal.SIGKILL, 1), (signal.SIGKILL, 0), (signal.SIGTERM, 1),
                                          (signal.SIGSTOP, 0)],
                         ids=["kill-last-hop", "kill-first-hop", "term-last-hop", "stop-first-hop"])
def test_generation_survives_a_server_failure_unchanged(swarm: LocalSwarm, model_dir: Path, reference: list[int],
                                                        sig: int, hop: int) -> None:
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers) as client:
        tokens, failed = _generate_and_hit(client, swarm, hop, sig)
        assert tokens == reference
        session = client.last_session
        assert session is not None
        before = client.last_route
        assert before[hop].peer_id == failed
        assert [f.peer_id for f in session.failovers] == [failed]
        failover = session.failovers[0]
        assert failover.span == before[hop].span and failed not in failover.replacement
        assert failover.replayed_tokens >= len(PROMPT) + KILL_AFTER - 1
        assert failed not in [h.peer_id for h in session.route]  # the route no longer uses it
        if sig == signal.SIGSTOP:  # found by stall detection, well before the 60 s step deadline
            assert failover.seconds < 15
        # a later generation is still exact and does not run on the failed peer: the ban keeps it out of the
        # plan, or (a machine so slow that the first ban, 1 s, ended and the DHT still lists the peer) the
        # session replaces it when it opens
        assert client.generate(PROMPT, 8, stop_token_ids=()) == reference[:8]
        later = client.last_session
        assert later is not None and later is not session
        assert failed not in [h.peer_id for h in later.route]


def test_dead_server_still_listed_in_the_dht_is_replaced_at_open(swarm: LocalSwarm, model_dir: Path,
                                                                  reference: list[int]) -> None:
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, spread=False) as client:
        planned = client.plan()  # caches the view: the dead server stays in it (and in the DHT for a while)
        dead = _server(swarm, planned[1].peer_id)  # without spread, the next session plans the same route
        dead.proc.kill(signal.SIGKILL)
        dead.proc.stop(timeout=10)
        assert client.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == reference
        session = client.last_session
        assert session is not None and [f.peer_id for f in session.failovers] == [dead.peer_id]
        assert session.failovers[0].replayed_tokens == 0


def test_without_failover_a_dead_server_ends_the_generation_with_a_clear_error(
        swarm: LocalSwarm, model_dir: Path) -> None:
    from meshinfer.errors import MeshinferError

    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, failover=False) as client:
        with pytest.raises(MeshinferError, match=r"lost the session|cannot|stream"):
            _generate_and_hit(client, swarm, 1, signal.SIGKILL)
