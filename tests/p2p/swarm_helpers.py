"""Helpers for multi-process P2P tests: start test peers (``peer_proc.py``) and stop them by PID.

``stop_all`` also checks that nothing the stopped processes started (their ``p2pd``) survives them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshinfer.testing.procs import ManagedProcess, wait_gone

PEER_SCRIPT = Path(__file__).with_name("peer_proc.py")


@dataclass
class Peer:
    proc: ManagedProcess
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def maddrs(self) -> list[str]:
        return self.info["maddrs"]

    def cmd(self, timeout: float = 30.0, **command: Any) -> dict[str, Any]:
        reply = self.proc.request(command, timeout)
        assert "error" not in reply, reply.get("trace", reply)
        return reply


def launch_peer(initial_peers: Sequence[str], identity: str | None = None) -> ManagedProcess:
    argv = [sys.executable, str(PEER_SCRIPT), "--initial-peers", *initial_peers]
    if identity:
        argv += ["--identity", identity]
    return ManagedProcess(argv, name="test peer")


def start_peers(initial_peers: Sequence[str], n: int) -> list[Peer]:
    """Start ``n`` peers in parallel and wait until each printed its ready line."""
    procs = [launch_peer(initial_peers) for _ in range(n)]
    peers = []
    try:
        for proc in procs:
            peers.append(Peer(proc, proc.read_json(timeout=90)))
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return peers


def stop_all(procs: Sequence[ManagedProcess]) -> None:
    """Stop processes by PID (graceful first) and assert none of their children survive."""
    tree = {p.pid: p.descendants() for p in procs}
    for p in procs:
        if p.alive():
            try:
                p.send_json({"cmd": "exit"})
            except OSError:
                pass
    for p in procs:
        p.stop(timeout=10)
    leftovers = wait_gone([pid for kids in tree.values() for pid in kids], timeout=10)
    assert not leftovers, f"processes left behind: {leftovers}"


@dataclass
class Swarm:
    dht: ManagedProcess
    bootstrap: list[str]
    peers: list[Peer]
