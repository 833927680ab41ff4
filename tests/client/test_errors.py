"""Bad cases against a real swarm: no coverage, partial coverage, unreachable peers, server-side errors.

One server process serves only blocks 0:2 of a 4-block model with a tiny KV budget; another model has
no server at all. Every failure must be one clear line (``error: ...``, exit 2 on the CLI).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
import torch
from client_helpers import PROMPT, start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.client.routing import NoRouteError
from meshinfer.client.session import InferenceSession
from meshinfer.client.swarm import ModelRef, SwarmView
from meshinfer.errors import RemoteError, TransportError
from meshinfer.loopthread import LoopThread
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm
from meshinfer.types import BlockRange
from meshinfer.wire.messages import ErrorCode

pytestmark = pytest.mark.slow

CLI_TIMEOUT = 120
ABSENT_PEER = "QmUgiTTUZGzfmv1zj7Rp1EVkb1VHuz4qxrodikpJKo4PSw"


@pytest.fixture(scope="module")
def half_swarm(bootstrap: list[str]) -> Iterator[LocalSwarm]:
    """A server of blocks 0:2 only (of 4), with room for 16 tokens of KV cache, all of which one peer may take
    (these tests are about the server's whole budget; tests/server/test_fair_attacks.py tests the per-peer share)."""
    swarm = start_swarm(tiny_checkpoint("llama", variant="mha"), [(0, 2)], bootstrap,
                        server_args=("--cache-tokens", "16", "--max-kv-tokens-per-peer", "1.0"))
    try:
        yield swarm
    finally:
        stop_swarm(swarm)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def generate_cli(model: str, *peers: str) -> subprocess.CompletedProcess[str]:
    argv = meshinfer_argv("generate", "--model", model, "--prompt", PROMPT, "--max-new-tokens", "4",
                          "--initial-peers", *peers)
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False)


def test_cli_model_without_any_server(half_swarm: LocalSwarm) -> None:
    unserved = tiny_checkpoint("llama", variant="mha", seed=1)  # same shapes, other bytes: another model id
    line = one_line_error(generate_cli(str(unserved), *half_swarm.initial_peers))
    assert "no online servers cover blocks 0:4 of model" in line and unserved.name in line
    assert "no server of this model was found" in line


def test_partial_coverage_names_the_missing_blocks(half_swarm: LocalSwarm) -> None:
    with DistributedModel.from_pretrained(half_swarm.model_dir, half_swarm.initial_peers, route_wait=1.0) as model:
        with pytest.raises(NoRouteError, match=r"no online servers cover blocks 2:4 of model tiny-llama-mha"):
            model.generate([1, 2, 3], 4)
        with pytest.raises(NoRouteError) as info:
            model.plan()
        assert model.model_id[:12] in str(info.value) and "no server of this model" not in str(info.value)


def test_server_errors_surface_with_their_code(half_swarm: LocalSwarm) -> None:
    with DistributedModel.from_pretrained(half_swarm.model_dir, half_swarm.initial_peers) as model:
        runner, view = model._runner, model.view
        route = runner.run(view.plan(model.ref, blocks=BlockRange(0, 2)))
        assert [h.peer_id for h in route] == [half_swarm.servers[0].peer_id]
        async def first_step(model_id: str, max_length: int) -> None:
            # Open and the first step go back to back: a refused Open fails that step (no replan: with its code)
            session = await InferenceSession.open(view.node, route, model_id=model_id, max_length=max_length)
            try:
                await session.step(torch.zeros(3, model.spec.hidden_size))
            finally:
                await session.close()

        # more KV cache than the server's budget of 16 tokens: refused at open
        with pytest.raises(RemoteError, match=r"^overloaded: .*\(server .* \(blocks 0:2\)\)$") as info:
            runner.run(first_step(model.model_id, 64))
        assert info.value.code == ErrorCode.OVERLOADED
        # a model id the server does not serve
        with pytest.raises(RemoteError) as info:
            runner.run(first_step("0" * 32, 8))
        assert info.value.code == ErrorCode.UNKNOWN_MODEL
        # within budget it works, and the memory of the refused sessions was never taken
        session = runner.run(InferenceSession.open(view.node, route, model_id=model.model_id, max_length=16))
        try:
            out = runner.run(session.step(torch.zeros(3, model.spec.hidden_size)))
            assert out.shape == (3, model.spec.hidden_size)
        finally:
            runner.run(session.close())


def test_cli_unreachable_and_invalid_bootstrap(half_swarm: LocalSwarm) -> None:
    model = str(half_swarm.model_dir)
    # a well-formed address of a peer that does not exist (not a swarm member: nothing can find it otherwise)
    line = one_line_error(generate_cli(model, f"/ip4/127.0.0.1/tcp/9/p2p/{ABSENT_PEER}"))
    assert "initial peer" in line, line
    line = one_line_error(generate_cli(model, "not-a-multiaddr"))
    assert "invalid initial peer 'not-a-multiaddr'" in line


def test_python_api_without_peers_browses_the_lan_and_says_so(half_swarm: LocalSwarm) -> None:
    """No initial peers: the peers found on this LAN by mDNS; the test swarm binds 127.0.0.1 (never advertised),
    so nothing is found: one clear TransportError naming the browse and the fix, not a hang."""
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="no meshinfer peers found on this LAN by mDNS within 3 s; pass "
                                              "--initial-peers"):
        DistributedModel.from_pretrained(half_swarm.model_dir, [])
    assert time.monotonic() - t0 < 60


def test_swarm_view_caches_and_refreshes_in_the_background(half_swarm: LocalSwarm) -> None:
    model = ModelRef(half_swarm.model_id, 4, "half")
    with LoopThread() as runner:
        view = runner.run(SwarmView.join(half_swarm.initial_peers, max_age=30.0))
        try:
            cov = runner.run(view.coverage(model))
            assert list(cov.servers) == [half_swarm.servers[0].peer_id] and cov.counts() == [1, 1, 0, 0]
            assert runner.run(view.coverage(model)) is cov  # fresh enough: served from the cache
            assert runner.run(view.coverage(model, refresh=True)) is not cov

            async def start() -> None:
                view.start_refresh(model, interval=0.2)

            runner.run(start())
            time.sleep(1.0)
            age = view.age(model.model_id)
            assert age is not None and age < 0.6  # re-read in the background meanwhile
            assert view.cached(model.model_id) is not cov
        finally:
            runner.run(view.close())
