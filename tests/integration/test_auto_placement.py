"""Automatic block placement with real ``meshinfer serve`` processes on 127.0.0.1 (issue 5, items 2 and 3).

Four servers started at once without ``--blocks`` (``--num-blocks 4``) on a 12-block model cover every
block; one leaves with SIGTERM (draining the session it holds for ``--drain-timeout`` s, then ending
it with an error); the other three re-cover the hole by rebalancing, and distributed greedy generation
then equals the local engine. Flag errors of the new options are one-line errors with exit code 2.
Every process is started through ``LocalSwarm`` and stopped by PID; nothing may outlive the test.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from safetensors.torch import load_file, save_file

from meshinfer.cli.main import main
from meshinfer.client.model import DistributedModel
from meshinfer.loopthread import run_on
from meshinfer.models.engine import LocalModel
from meshinfer.p2p.announce import Coverage
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import wait_gone
from meshinfer.testing.swarm import LocalSwarm, ServerProcess
from meshinfer.types import BlockRange
from meshinfer.wire.records import ServerRecord

pytestmark = pytest.mark.slow

T = TypeVar("T")
NUM_BLOCKS = 12
DRAIN_TIMEOUT = 2.0
SERVER_ARGS = ["--num-blocks", "4", "--rebalance-interval", "2", "--drain-timeout", str(DRAIN_TIMEOUT),
               "--announce-ttl", "20", "--announce-refresh", "5"]
PROMPT = "The keeper climbed the tower"


@pytest.fixture(scope="module")
def model12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-block Llama in HF format: the tiny 4-block checkpoints of seeds 0, 1 and 2, stacked."""
    parts = [tiny_checkpoint("llama", seed=seed) for seed in range(3)]
    out = tmp_path_factory.mktemp("tiny-llama-12")
    for item in parts[0].iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, out / item.name)
    config = json.loads((parts[0] / "config.json").read_text())
    per_part = config["num_hidden_layers"]
    config["num_hidden_layers"] = per_part * len(parts)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {name: t for name, t in load_file(str(parts[0] / "model.safetensors")).items() if ".layers." not in name}
    for k, part in enumerate(parts):
        for name, t in load_file(str(part / "model.safetensors")).items():
            if ".layers." in name:
                prefix, rest = name.split(".layers.", 1)
                index, tail = rest.split(".", 1)
                tensors[f"{prefix}.layers.{int(index) + k * per_part}.{tail}"] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something other than None (AssertionError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def coverage(client: DistributedModel) -> Coverage:
    return run_on(client.loop, client.view.coverage(client.ref, refresh=True), 30)


def online_cover(client: DistributedModel, peers: set[str]) -> dict[str, ServerRecord] | None:
    """The online records of ``peers`` if together they cover every block, else None."""
    online = {p: r for p, r in coverage(client).servers.items() if p in peers and r.state == "online"}
    covered = {b for r in online.values() for b in r.span.blocks()}
    return online if covered == set(range(NUM_BLOCKS)) else None


def sole_server(records: dict[str, ServerRecord]) -> str:
    """A peer that alone serves some block (one always exists: 4 spans of 4 cannot cover 12 blocks twice)."""
    for peer, record in records.items():
        if any(all(b not in r.span for p, r in records.items() if p != peer) for b in record.span.blocks()):
            return peer
    raise AssertionError(f"no block is served by a single server: {records}")


@pytest.fixture
def swarm(model12: Path) -> Iterator[LocalSwarm]:
    swarm = LocalSwarm(model12, spans=None, auto_servers=4, server_args=SERVER_ARGS, startup_timeout=120)
    try:
        yield swarm.start()
    finally:
        procs = [s.proc for s in swarm.servers] + ([swarm.dht] if swarm.dht else [])
        tree = [pid for p in procs for pid in p.descendants()]
        swarm.stop()
        assert all(not p.alive() for p in procs)
        assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"


def test_four_self_placing_servers_cover_the_model_and_recover_from_a_leave(model12: Path,
                                                                             swarm: LocalSwarm) -> None:
    assert [s.auto for s in swarm.servers] == [True] * 4
    assert all(s.span is not None and len(s.span) == 4 for s in swarm.servers)  # --num-blocks 4, placed itself
    peers = {s.peer_id: s for s in swarm.servers}
    with DistributedModel.from_pretrained(model12, swarm.initial_peers) as client:
        # all four online (three can already cover the 12 blocks while the fourth's record is still on its way)
        records = wait_for(lambda: (r if (r := online_cover(client, set(peers))) and len(r) == 4 else None), 60,
                           "4 servers to cover all 12 blocks")
        assert all(len(r.span) == 4 for r in records.values())

        # one server leaves (SIGTERM) while a session is open on it: it drains, then ends the session
        leaving: ServerProcess = peers[sole_server(records)]
        session = client.open_session(max_length=32)
        assert leaving.peer_id in {h.peer_id for h in session.route}
        started = time.monotonic()
        leaving.proc.kill(signal.SIGTERM)
        code = leaving.proc.proc.wait(timeout=30)
        took = time.monotonic() - started
        session.close()
        assert code == 0, leaving.proc.stderr_tail()
        log = leaving.proc.stderr_tail(200)
        assert took >= DRAIN_TIMEOUT - 0.2, f"exited after {took:.1f}s without waiting for its open session"
        assert took < DRAIN_TIMEOUT + 15, f"draining took {took:.1f}s"
        assert "waiting up to 2 s for 1 open sessions" in log and "ending 1 sessions" in log, log
        gone = coverage(client).servers.get(leaving.peer_id)
        assert gone is not None and gone.state == "draining"  # it said goodbye; the record expires by itself

        # the other three re-cover the hole (one of them moves), then generation equals the local engine
        rest = set(peers) - {leaving.peer_id}
        after = wait_for(lambda: online_cover(client, rest), 90, "the remaining 3 servers to re-cover the hole")
        assert sorted((r.span.start, r.span.end) for r in after.values()) == [(0, 4), (4, 8), (8, 12)]
        assert any(r.span != records[p].span for p, r in after.items()), "nobody moved, yet the hole is gone"

        local = LocalModel.from_pretrained(model12)
        prompt = [int(i) for i in local.tokenizer(PROMPT)["input_ids"]]
        assert client.generate(prompt, 8, stop_token_ids=()) == local.generate(prompt, 8, stop_token_ids=())
        assert {h.peer_id for h in client.last_route} == rest
    assert all(s.alive() for s in swarm.servers if s.peer_id in rest)


def test_fixed_server_never_moves_and_a_second_sigterm_cuts_the_drain_short(model12: Path) -> None:
    swarm = LocalSwarm(model12, spans=[(0, NUM_BLOCKS)], server_args=["--drain-timeout", "60",
                                                                      "--rebalance-interval", "1"])
    with swarm:
        server = swarm.servers[0]
        assert not server.auto and server.info["auto_placement"] is False
        with DistributedModel.from_pretrained(model12, swarm.initial_peers) as client:
            session = client.open_session(max_length=16)
            started = time.monotonic()
            server.proc.kill(signal.SIGTERM)
            time.sleep(1.0)
            assert server.alive()  # draining: it waits for the open session
            server.proc.kill(signal.SIGTERM)  # impatient: end the sessions now
            code = server.proc.proc.wait(timeout=30)
            took = time.monotonic() - started
            session.close()
        log = server.proc.stderr_tail(200)
        assert code == 0 and took < 20, (code, took, log)
        assert "second stop signal" in log and "ending 1 sessions" in log, log
        assert "rebalance" not in log and "re-check the placement" not in log  # --blocks: never moves


@pytest.mark.parametrize(("flags", "text"), [
    (["--blocks", "0:2", "--num-blocks", "2"], "--blocks and --num-blocks exclude each other"),
    (["--num-blocks", "0"], "--num-blocks must be > 0"),
    (["--rebalance-interval", "-1"], "--rebalance-interval must be 0 (never move) or at least 1 second"),
    (["--rebalance-interval", "0.5"], "--rebalance-interval must be 0"),
    (["--rebalance-interval", "nan"], "--rebalance-interval must be 0"),
    (["--drain-timeout", "-2"], "--drain-timeout must be a number of seconds >= 0"),
    (["--drain-timeout", "inf"], "--drain-timeout must be"),
    (["--balance-quality", "0"], "--balance-quality must be in (0, 1]"),
    (["--balance-quality", "1.5"], "--balance-quality must be in (0, 1]"),
    (["--max-upload", "0"], "--max-upload must be > 0 MB/s"),
    (["--max-upload", "nan"], "--max-upload must be > 0 MB/s"),
    (["--max-download", "0"], "--max-download must be > 0 MB/s"),
    (["--max-download", "-2"], "--max-download must be > 0 MB/s"),
])
def test_bad_placement_flags_are_one_line_errors(model12: Path, capsys: pytest.CaptureFixture[str],
                                                 flags: list[str], text: str) -> None:
    assert main(["serve", "--model", str(model12), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and text in err and "\n" not in err, err


def test_valid_placement_flags_build_a_self_placing_config() -> None:
    from meshinfer.server.config import ServerConfig

    auto = ServerConfig(model="m", num_blocks=3, rebalance_interval=0, drain_timeout=0)
    assert auto.auto_placement and auto.span is None
    fixed = ServerConfig(model="m", blocks="2:5")
    assert not fixed.auto_placement and fixed.span == BlockRange(2, 5)
    assert (fixed.rebalance_interval, fixed.drain_timeout, fixed.balance_quality) == (30.0, 30.0, 0.75)
