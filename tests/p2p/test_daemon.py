"""The parent-death guarantee behind "no orphan p2pd", tested on a child that would never exit itself."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from meshinfer.testing.procs import ManagedProcess, pid_alive, wait_gone

pytestmark = pytest.mark.slow

# What hivemind's daemon module does to start p2pd, with `sleep` in its place: only the
# parent-death signal that meshinfer installs can end it when its parent is SIGKILLed.
CHILD = """
import asyncio, sys
from meshinfer.p2p.daemon import _hm_daemon, install_parent_death_signal
{install}
async def main():
    proc = await _hm_daemon.asyncio.subprocess.create_subprocess_exec("sleep", "120")
    print(proc.pid, flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


def start(install: bool) -> tuple[ManagedProcess, int]:
    code = CHILD.format(install="install_parent_death_signal()" if install else "")
    proc = ManagedProcess([sys.executable, "-c", code], name="parent")
    return proc, int(proc.read_line(timeout=60))


def cleanup(proc: ManagedProcess, sleeper: int) -> None:
    if pid_alive(sleeper):  # we started it (through the child): clean up by its PID
        os.kill(sleeper, signal.SIGKILL)
    proc.stop()
    assert wait_gone([sleeper], timeout=10) == []


def test_children_started_through_hivemind_die_with_their_parent() -> None:
    proc, sleeper = start(install=True)
    try:
        assert pid_alive(sleeper)
        proc.kill(signal.SIGKILL)
        proc.proc.wait(timeout=10)
        assert wait_gone([sleeper], timeout=10) == []
    finally:
        cleanup(proc, sleeper)


def test_without_the_guard_the_child_would_be_orphaned() -> None:
    """The control experiment: it is the guard, not luck, that ends the child above."""
    proc, sleeper = start(install=False)
    try:
        proc.kill(signal.SIGKILL)
        proc.proc.wait(timeout=10)
        assert wait_gone([sleeper], timeout=1.0) == [sleeper]
    finally:
        cleanup(proc, sleeper)
