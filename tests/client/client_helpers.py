"""Helpers for client tests: start and stop local swarms by PID, checking nothing is left behind."""

from __future__ import annotations

from pathlib import Path

from meshinfer.testing.procs import ManagedProcess, wait_gone
from meshinfer.testing.swarm import LocalSwarm

PROMPT = "The keeper climbed the tower"


def stop_and_check(procs: list[ManagedProcess]) -> None:
    """Stop ``procs`` (by PID) and assert nothing they started is left running."""
    tree = [pid for p in procs for pid in p.descendants()]
    for p in procs:
        p.stop(timeout=10)
    assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"


def start_swarm(model_dir: Path, spans: list[tuple[int, int]], bootstrap: list[str],
                server_args: tuple[str, ...] = ()) -> LocalSwarm:
    """Servers of ``model_dir`` for ``spans``, joined through an existing bootstrap peer."""
    return LocalSwarm(model_dir, spans, initial_peers=bootstrap, server_args=server_args,
                      startup_timeout=120).start()


def stop_swarm(swarm: LocalSwarm) -> None:
    """Stop every server of ``swarm`` and check that none of their children (p2pd) survive."""
    procs = [s.proc for s in swarm.servers]
    tree = [pid for p in procs for pid in p.descendants()]
    swarm.stop()
    assert all(not p.alive() for p in procs)
    assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"
