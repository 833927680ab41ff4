"""Quant modes through real server processes: a route uses one mode on every hop, the most precise that covers
the model unless the client asks for one, a mix is refused in one line, failover keeps the session's mode, a
server refuses a session of another mode, and the swarm's int4 tokens equal the local int4 engine's."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from client_helpers import start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.client.routing import NoRouteError
from meshinfer.client.session import InferenceSession
from meshinfer.errors import RemoteError
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 7, 99, 3]
NEW_TOKENS = 48
DRAIN = ("--drain-timeout", "0.2")


@pytest.fixture(scope="module")
def model_dir(meshinfer_cache_dir: Path) -> Path:
    return tiny_checkpoint("llama", seed=333)  # its own model id: no records of other tests' servers


@pytest.fixture(scope="module")
def swarm(model_dir: Path, bootstrap: list[str]) -> Iterator[LocalSwarm]:
    """Two int4 servers of the whole model, an unquantized one of 0:2 and an int8 one of 2:4."""
    swarm = start_swarm(model_dir, [(0, 4), (0, 4)], bootstrap, server_args=(*DRAIN, "--quant", "int4"))
    try:
        swarm.add_server((0, 2), extra_args=["--quant", "none"])
        swarm.add_server((2, 4), extra_args=["--quant", "int8"])
        yield swarm
    finally:
        stop_swarm(swarm)


@pytest.fixture(scope="module")
def local_int4(model_dir: Path) -> list[int]:
    return LocalModel.from_pretrained(model_dir, quant="int4", head_quant="none").generate(
        PROMPT, NEW_TOKENS, stop_token_ids=())


def _modes(swarm: LocalSwarm, peers: list[str]) -> list[str]:
    by_peer = {s.peer_id: s.info["quant"] for s in swarm.servers}
    return [by_peer[p] for p in peers]


def test_servers_announce_their_mode_and_weight_bytes(swarm: LocalSwarm) -> None:
    info = [(s.info["blocks"], s.info["quant"]) for s in swarm.servers]
    assert info == [("0:4", "int4"), ("0:4", "int4"), ("0:2", "none"), ("2:4", "int8")]
    sizes = {s.info["quant"]: s.info["weight_bytes"] / (s.span.end - s.span.start) for s in swarm.servers}
    assert 0 < sizes["int4"] < sizes["int8"] < sizes["none"]  # bytes per block, as held


def test_auto_takes_the_one_mode_that_covers_the_model_and_equals_the_local_engine(
        swarm: LocalSwarm, model_dir: Path, local_int4: list[int]) -> None:
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers) as client:
        assert client.generate(PROMPT, NEW_TOKENS, stop_token_ids=()) == local_int4
        assert client.last_session is not None
        assert _modes(swarm, [h.peer_id for h in client.last_session.route]) == ["int4"]


def test_a_mode_that_only_a_mix_would_cover_is_refused_in_one_line(swarm: LocalSwarm, model_dir: Path) -> None:
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, quant="int8", route_wait=0.5) as client:
        with pytest.raises(NoRouteError) as err:
            client.generate(PROMPT, 4)
    text = str(err.value)
    assert "\n" not in text and "no servers at quant int8 cover every block" in text
    assert "int4 covers 0:4" in text and "int8 covers 2:4" in text and "none covers 0:2" in text


def test_a_server_refuses_a_session_of_another_mode(swarm: LocalSwarm, model_dir: Path) -> None:
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, quant="int4") as client:
        route = client.plan()

        async def open_as_int8() -> None:
            session = await InferenceSession.open(client.view.node, route, model_id=client.model_id, max_length=8,
                                                  quant="int8")
            try:  # Open is pipelined with the first step (issue 21): its refusal surfaces there
                await session.forward(torch.zeros(1, client.spec.hidden_size))
            finally:
                await session.close()

        with pytest.raises(RemoteError) as err:
            client._runner.run(open_as_int8(), timeout=60)
    assert err.value.code == "span_not_served"
    assert "holds its weights as int4, the session's route runs int8" in str(err.value)


def test_failover_replaces_a_dead_server_with_one_of_the_same_mode(swarm: LocalSwarm, model_dir: Path,
                                                                    local_int4: list[int]) -> None:
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers) as client:
        tokens: list[int] = []
        victim = None
        for token in client.stream(PROMPT, NEW_TOKENS, stop_token_ids=()):
            tokens.append(token)
            if len(tokens) == 6:
                assert client.last_session is not None
                victim = next(s for s in swarm.servers if s.peer_id == client.last_session.route[0].peer_id)
                victim.proc.kill(signal.SIGKILL)
        assert tokens == local_int4
        session = client.last_session
        assert session is not None and victim is not None
        assert [f.peer_id for f in session.failovers] == [victim.peer_id]
        assert _modes(swarm, [h.peer_id for h in session.route]) == ["int4"]  # never the none/int8 servers
