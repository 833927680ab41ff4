"""Prompt-cache reuse through real server processes (``client.prefix_cache`` in ``DistributedModel``): a chat's
second turn continues the first turn's session (the servers get only the new tokens) with the same greedy tokens
as a fresh generation, speculation on and off; eviction and TTL expiry close held sessions on the server (its
sessions and KV reservation go back to zero); reuse off by config; a held session whose server was SIGKILLed is
replaced without any visible error, same tokens. One swarm for the module: one server of the whole tiny llama with
a metrics port (routes are then deterministic), a twin added for the failover test."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_helpers import start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.models.engine import LocalModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

TURN1 = [5, 17, 42, 7, 99, 3, 11, 23] * 5  # 40 tokens
NEW = 12
USER2 = [9, 8, 7, 61, 62]
SEED = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORTS = (free_port(), free_port())


def gauges(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("meshinfer_sessions_open ", "meshinfer_kv_tokens_used ")):
            name, value = line.split()
            out[name] = float(value)
    return out


def wait_sessions(port: int, want: int, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(port)
        if g["meshinfer_sessions_open"] == want or time.monotonic() > deadline:
            return g
        time.sleep(0.2)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_checkpoint("llama", seed=SEED)


@pytest.fixture(scope="module")
def turns(model_dir: Path) -> tuple[list[int], list[int], list[int]]:
    """Turn 1's output, turn 2's prompt and its fresh greedy output (a local model)."""
    local = LocalModel.from_pretrained(model_dir)
    out1 = local.generate(TURN1, NEW, stop_token_ids=())
    prompt2 = TURN1 + out1 + USER2
    return out1, prompt2, local.generate(prompt2, NEW, stop_token_ids=())


@pytest.fixture(scope="module")
def swarm(model_dir: Path, bootstrap: list[str]) -> Iterator[LocalSwarm]:
    swarm = start_swarm(model_dir, [(0, 4)], bootstrap, server_args=("--metrics-port", str(PORTS[0])))
    try:
        yield swarm
    finally:
        stop_swarm(swarm)


def test_turn_two_continues_the_held_session_same_tokens(swarm: LocalSwarm, model_dir: Path,
                                                         turns: tuple[list[int], list[int], list[int]]) -> None:
    out1, prompt2, ref2 = turns
    for speculate in (False, True):
        with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False,
                                              speculate=speculate, prompt_cache_sessions=8) as client:
            assert client.generate(TURN1, NEW, stop_token_ids=()) == out1
            first = client.last_session
            assert first is not None and len(client.prompt_cache) == 1
            assert wait_sessions(PORTS[0], 1)["meshinfer_sessions_open"] == 1  # held open on the server
            assert client.generate(prompt2, NEW, stop_token_ids=()) == ref2
            stats = client.prompt_cache.stats
            assert (stats.hits, stats.misses, stats.fallbacks) == (1, 1, 0)
            keep = len(TURN1) + NEW - 1  # turn 1's last token was never sent
            assert stats.tokens_reused == keep
            assert client.last_session is first  # the same session, continued
            sent = [(position, tokens) for _, position, tokens in first.hops[0].steps]
            assert sent[0] == (0, len(TURN1))
            assert (keep, len(prompt2) - keep) in sent  # only the new tokens of turn 2
            assert sum(1 for position, _ in sent if position == 0) == 1
        g = wait_sessions(PORTS[0], 0)
        assert g["meshinfer_sessions_open"] == 0 and g["meshinfer_kv_tokens_used"] == 0  # close() closed it


def test_eviction_ttl_and_off(swarm: LocalSwarm, model_dir: Path) -> None:
    prompts = [[i + 1] * 3 + TURN1 for i in range(3)]
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False,
                                          prompt_cache_sessions=1) as client:
        for prompt in prompts:
            client.generate(prompt, 4, stop_token_ids=())
        assert client.prompt_cache.stats.evictions == 2 and len(client.prompt_cache) == 1
        assert wait_sessions(PORTS[0], 1)["meshinfer_sessions_open"] == 1  # the evicted ones closed there
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False,
                                          prompt_cache_sessions=8, prompt_cache_ttl=1.0) as client:
        client.generate(TURN1, 4, stop_token_ids=())
        g = wait_sessions(PORTS[0], 0)
        assert g["meshinfer_sessions_open"] == 0 and g["meshinfer_kv_tokens_used"] == 0
        assert client.prompt_cache.stats.expirations == 1 and len(client.prompt_cache) == 0
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False,
                                          prompt_cache_sessions=0) as client:
        client.generate(TURN1, 4, stop_token_ids=())
        client.generate([*TURN1, 1, 2], 4, stop_token_ids=())
        assert client.prompt_cache.stats.hits == 0 and len(client.prompt_cache) == 0
        assert wait_sessions(PORTS[0], 0)["meshinfer_sessions_open"] == 0


def test_held_sessions_give_way_when_the_servers_are_full(swarm: LocalSwarm, model_dir: Path) -> None:
    # held sessions soon fill what the server lets one peer hold (sessions; each also reserves the whole context)
    with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False, prompt_cache_sessions=64,
                                          failover=False,  # the refusal comes at once, not after replacements
                                          prompt_cache_headroom=10**6) as client:
        local = LocalModel.from_pretrained(model_dir)
        full = 16 * sum(s.proc.alive() for s in swarm.servers)  # each server: 16 per peer (--max-sessions-per-peer)
        for i in range(full + 2):
            prompt = [i + 1] * 3 + TURN1
            assert client.generate(prompt, 2, stop_token_ids=()) == local.generate(prompt, 2, stop_token_ids=())
        assert len(client.prompt_cache) <= full  # refused opens closed the held sessions, unseen by the caller


def test_audited_turns_reuse_the_session_same_tokens(
        swarm: LocalSwarm, model_dir: Path, turns: tuple[list[int], list[int], list[int]]) -> None:
    out1, prompt2, ref2 = turns
    swarm.add_server((0, 4), extra_args=("--metrics-port", str(free_port())))  # an auditor for the other one
    for speculate in (False, True):
        with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=True, speculate=speculate,
                                              prompt_cache_sessions=8) as client:
            deadline = time.monotonic() + 60  # both servers known: the session's hop gets an audit shadow
            alive = {s.peer_id for s in swarm.servers if s.alive()}
            while not alive <= set(client._runner.run(client.view.coverage(client.ref, refresh=True)).servers):
                assert time.monotonic() < deadline
                time.sleep(0.5)
            assert client.generate(TURN1, NEW, stop_token_ids=()) == out1
            assert client.generate(prompt2, NEW, stop_token_ids=()) == ref2
            assert client.prompt_cache.stats.hits == 1
            audits = client.audits
            assert audits.detections == 0 and sum(p.passed for p in audits.peers.values()) > 0


def test_a_held_session_whose_server_died_is_replaced_silently(
        swarm: LocalSwarm, model_dir: Path, turns: tuple[list[int], list[int], list[int]]) -> None:
    out1, prompt2, ref2 = turns
    for failover in (False, True):
        with DistributedModel.from_pretrained(model_dir, swarm.initial_peers, audit=False,
                                              failover=failover, prompt_cache_sessions=8) as client:
            assert client.generate(TURN1, NEW, stop_token_ids=()) == out1
            held = client.last_session
            assert held is not None
            victim = next(s for s in swarm.servers if s.peer_id == held.route[0].peer_id)
            swarm.add_server((0, 4), extra_args=("--metrics-port", str(free_port())))  # somewhere to go
            victim.proc.kill(signal.SIGKILL)
            assert client.generate(prompt2, NEW, stop_token_ids=()) == ref2
            stats = client.prompt_cache.stats
            assert stats.hits == 1
            if failover:  # the session itself replaced the server, replaying what it held
                assert client.last_session is held and held.failovers
            else:  # the session failed at its first step: a fresh one took over
                assert stats.fallbacks == 1 and client.last_session is not held
            assert client.last_session is not None and client.last_session.route[0].peer_id != victim.peer_id
