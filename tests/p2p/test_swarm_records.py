"""Signed DHT records across real processes: announce/read, forgery rejected, expiry, SIGKILL, identity.

One module-scoped swarm (a ``meshinfer dht`` bootstrap + peers A, B, C) is reused by every test; each
test uses its own model id so tests do not see each other's records.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from swarm_helpers import Peer, Swarm, launch_peer, start_peers, stop_all

from meshinfer.cli.main import main
from meshinfer.testing.procs import ManagedProcess, command_line, meshinfer_argv, wait_gone

pytestmark = pytest.mark.slow


def mid(name: str) -> str:
    """A model id (32 hex characters, as a manifest id is) for a readable test name."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def wait_until(fn, timeout: float, interval: float = 0.3):
    """Poll ``fn()`` until it returns a truthy value (returned) or ``timeout`` s pass (last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps tables to 80 columns when not on a terminal
    return subprocess.run(meshinfer_argv(*args), capture_output=True, text=True, timeout=timeout, env=env)


def test_announce_and_read_coverage(swarm: Swarm, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "320")
    a, b, c = swarm.peers
    assert a.cmd(cmd="announce", model_id=mid("m-read"), num_blocks=4, span=[0, 2], name="alpha")["ok"]
    assert b.cmd(cmd="announce", model_id=mid("m-read"), num_blocks=4, span=[1, 4])["ok"]

    cov = c.cmd(cmd="coverage", model_id=mid("m-read"), num_blocks=4)
    assert cov["complete"]
    assert cov["blocks"] == [[a.peer_id], sorted([a.peer_id, b.peer_id]), [b.peer_id], [b.peer_id]]
    assert cov["servers"][a.peer_id] == {"span": [0, 2], "public_name": "alpha"}
    assert cov["servers"][b.peer_id]["span"] == [1, 4]
    models = dict(c.cmd(cmd="models")["models"])
    assert models[mid("m-read")] == 2

    # The same swarm through the real CLI, as a client-only peer joining via the bootstrap.
    out = run_cli("swarm", "--initial-peers", *swarm.bootstrap, "--json")
    assert out.returncode == 0, out.stderr
    doc = {m["model_id"]: m for m in json.loads(out.stdout)["models"]}
    m = doc[mid("m-read")]
    assert m["num_blocks"] == 4 and m["block_servers"] == [1, 2, 1, 1] and m["missing_blocks"] == []
    assert {(s["peer_id"], s["span"]) for s in m["servers"]} == {(a.peer_id, "0:2"), (b.peer_id, "1:4")}
    assert main(["swarm", "--initial-peers", *swarm.bootstrap]) == 0  # the table, in-process
    table = capsys.readouterr().out
    assert mid("m-read")[:16] in table and "0:1 ×1, 1:2 ×2, 2:4 ×1" in table and a.peer_id in table


@pytest.mark.parametrize("mode", ["other_subkey", "bad_signature", "bad_payload", "plain_value"])
def test_forged_writes_are_rejected(swarm: Swarm, mode: str) -> None:
    a, b, c = swarm.peers
    model = mid(f"m-forge-{mode}")
    assert a.cmd(cmd="announce", model_id=model, num_blocks=2, span=[0, 2], name="honest")["ok"]
    # C plays the attacker: every honest node that is asked to store it refuses.
    assert c.cmd(cmd="forge", mode=mode, model_id=model, victim=a.peer_id)["stored"] is False
    for reader in (a, b):
        cov = reader.cmd(cmd="coverage", model_id=model, num_blocks=2)
        assert cov["blocks"] == [[a.peer_id], [a.peer_id]], (mode, cov)
        assert cov["servers"] == {a.peer_id: {"span": [0, 2], "public_name": "honest"}}


def test_forgery_served_by_a_dishonest_storer_is_ignored(swarm: Swarm) -> None:
    a, b, c = swarm.peers
    model = mid("m-forge-inject")
    assert a.cmd(cmd="announce", model_id=model, num_blocks=2, span=[0, 2], name="honest")["ok"]
    # C skips validation and keeps a record "by A" in its own storage; readers must drop it.
    assert c.cmd(cmd="forge", mode="inject_local", model_id=model, victim=a.peer_id)["stored"] is True
    cov = b.cmd(cmd="coverage", model_id=model, num_blocks=2)
    assert cov["servers"] == {a.peer_id: {"span": [0, 2], "public_name": "honest"}}


def test_records_expire_without_refresh(swarm: Swarm) -> None:
    a, b, _ = swarm.peers
    assert a.cmd(cmd="put_once", model_id=mid("m-expire"), num_blocks=2, span=[0, 2], ttl=3.0)["ok"]
    assert b.cmd(cmd="coverage", model_id=mid("m-expire"), num_blocks=2)["blocks"] == [[a.peer_id]] * 2
    gone = wait_until(lambda: b.cmd(cmd="coverage", model_id=mid("m-expire"), num_blocks=2)["blocks"] == [[], []],
                      timeout=10)
    assert gone


def test_refresh_keeps_records_alive_and_stop_lets_them_expire(swarm: Swarm) -> None:
    a, b, _ = swarm.peers
    assert a.cmd(cmd="announce", model_id=mid("m-refresh"), num_blocks=1, span=[0, 1], ttl=2.5, refresh=0.8)["ok"]
    time.sleep(4.0)  # longer than the ttl: only refreshes keep it visible
    assert b.cmd(cmd="coverage", model_id=mid("m-refresh"), num_blocks=1)["blocks"] == [[a.peer_id]]
    a.cmd(cmd="stop_announce", model_id=mid("m-refresh"))
    assert wait_until(lambda: b.cmd(cmd="coverage", model_id=mid("m-refresh"), num_blocks=1)["blocks"] == [[]],
                      timeout=8)


def test_sigkilled_peer_leaves_nothing_behind_and_its_records_vanish(swarm: Swarm) -> None:
    (victim,) = start_peers(swarm.bootstrap, 1)
    try:
        assert victim.cmd(cmd="announce", model_id=mid("m-kill"), num_blocks=2, span=[0, 2], ttl=4.0, refresh=1.5)["ok"]
        reader = swarm.peers[1]
        assert reader.cmd(cmd="coverage", model_id=mid("m-kill"), num_blocks=2)["blocks"] == [[victim.peer_id]] * 2
        children = victim.proc.descendants()
        daemon = victim.info["daemon_pid"]
        assert daemon in children and "p2pd" in command_line(daemon)

        victim.proc.kill(signal.SIGKILL)
        victim.proc.proc.wait(timeout=10)
        assert wait_gone(children, timeout=10) == [], "p2pd outlived its SIGKILLed parent"
        assert wait_until(lambda: reader.cmd(cmd="coverage", model_id=mid("m-kill"),
                                             num_blocks=2)["blocks"] == [[], []], timeout=12)
        # The swarm keeps working for everyone else.
        a = swarm.peers[0]
        assert reader.cmd(cmd="ping", peer_id=a.peer_id, maddrs=a.maddrs)["ok"]
    finally:
        stop_all([victim.proc])


def test_duplicate_identity_is_reported(swarm: Swarm, tmp_path: Path) -> None:
    key = tmp_path / "peer.key"
    first = launch_peer(swarm.bootstrap, identity=str(key))
    procs: list[ManagedProcess] = [first]
    try:
        info = first.read_json(timeout=90)
        assert oct(os.stat(key).st_mode & 0o777) == oct(0o600)

        # Same key file on the same machine: refused at once by the key-file lock (a real process).
        same_file = run_cli("dht", "--identity", str(key), "--initial-peers", *swarm.bootstrap)
        assert same_file.returncode == 2
        assert same_file.stderr.strip().splitlines()[-1].startswith("error: identity ")
        assert "already in use" in same_file.stderr

        # A copy of the key (another machine, in effect): the swarm reports the live peer id.
        copy = tmp_path / "copy.key"
        copy.write_bytes(key.read_bytes())
        copy.chmod(0o600)
        # A real process, bounded in time: if the check missed the live peer, this dht would run on and
        # subprocess.run would kill it at the timeout (the test then fails instead of hanging).
        copied = run_cli("dht", "--identity", str(copy), "--initial-peers", *swarm.bootstrap, timeout=60)
        assert copied.returncode == 2, copied.stderr
        err = copied.stderr.strip().splitlines()[-1]
        assert err.startswith("error: identity ") and info["peer_id"] in err and "already in use" in err

        # The first peer was not disturbed.
        assert Peer(first, info).cmd(cmd="ping", peer_id=swarm.peers[0].peer_id, maddrs=swarm.peers[0].maddrs)["ok"]
    finally:
        stop_all(procs)
