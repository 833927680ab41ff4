"""Start and stop real meshinfer processes on 127.0.0.1, by PID, for tests, demos and benchmarks.

Contract: ``ManagedProcess`` runs one child with piped stdin/stdout/stderr; background threads drain
stdout into a line queue and keep the tail of stderr, so a chatty child never blocks. Reads are
always bounded (``read_line(timeout)``); a child that exits early raises ``RuntimeError`` carrying
its stderr tail. ``stop`` sends SIGTERM then SIGKILL to that one PID and waits; ``kill`` sends one
signal. ``descendants`` lists the child's process tree from /proc (to check that nothing, e.g. a
``p2pd``, outlives it). Nothing here ever signals a process it did not start, nor matches by name.
Imports no network code: it only runs commands.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any


def python_argv(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def meshinfer_argv(*args: str) -> list[str]:
    """argv running the ``meshinfer`` CLI with this interpreter."""
    return python_argv("meshinfer.cli.main", *args)


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid`` from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[1])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited process nobody reaped yet)."""
    stat = _read_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat is not None and stat[1] == pid:
                out.append(int(entry))
    return out


def descendants_of(pid: int) -> list[int]:
    """All processes below ``pid`` in the process tree (children, grandchildren, ...)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = children_of(frontier.pop())
        found.extend(kids)
        frontier.extend(kids)
    return found


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for ``pids`` to exit; return those still alive."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ManagedProcess:
    """One child process with bounded line-oriented I/O; stopped by its PID only."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 name: str | None = None) -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        full_env = dict(os.environ if env is None else env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=full_env, cwd=cwd,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=200)
        for pipe, sink, mark_end in ((self.proc.stdout, self._lines.put, True),
                                     (self.proc.stderr, self._stderr.append, False)):
            threading.Thread(target=self._pump, args=(pipe, sink, mark_end), daemon=True).start()

    @staticmethod
    def _pump(pipe: IO[bytes] | None, sink: Any, mark_end: bool) -> None:
        if pipe is None:
            return
        with pipe:  # closed by this thread at EOF (closing it elsewhere could block on this read)
            for raw in iter(pipe.readline, b""):
                sink(raw.decode(errors="replace").rstrip("\n"))
        if mark_end:  # stdout ended: wake readers
            sink(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self._stderr)[-lines:])

    def read_line(self, timeout: float) -> str:
        """The next stdout line; RuntimeError if the process ended, TimeoutError after ``timeout``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name} (pid {self.pid}) printed nothing within {timeout:g}s; "
                               f"stderr:\n{self.stderr_tail()}") from None
        if line is None:
            self._lines.put(None)
            self.proc.wait(timeout=5)
            raise RuntimeError(f"{self.name} (pid {self.pid}) exited with {self.proc.returncode}; "
                               f"stderr:\n{self.stderr_tail()}")
        return line

    def poll_line(self, timeout: float) -> str | None:
        """The next stdout line if one arrives within ``timeout`` s, else None (also at end of output)."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            self._lines.put(None)
        return line

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The fields of this process's ready line (``meshinfer.readyline``), skipping other stdout lines;
        AssertionError naming the process and its stderr tail after ``timeout`` s."""
        from meshinfer.readyline import parse_ready_line

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.poll_line(timeout=max(0.1, deadline - time.monotonic()))
            if line is not None and (info := parse_ready_line(line)) is not None:
                return info
        raise AssertionError(f"{self.name} not ready within {timeout:g}s: {self.stderr_tail()}")

    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next stdout line that is a JSON object (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            if line.startswith("{"):
                return json.loads(line)

    def send_json(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def request(self, obj: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send one JSON command line and return the next JSON line the process prints."""
        self.send_json(obj)
        return self.read_json(timeout)

    def descendants(self) -> list[int]:
        return descendants_of(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to this process only (never to its group or by name)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        return self.proc.returncode

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_dht(*, host: str = "127.0.0.1", port: int = 0, identity: str | None = None,
              initial_peers: Sequence[str] = (), timeout: float = 30.0) -> tuple[ManagedProcess, list[str]]:
    """Run ``meshinfer dht`` and return it with the multiaddrs it printed (it stops by itself if this process
    dies: its stdin is our pipe)."""
    args = ["dht", "--host", host, "--port", str(port), "--stop-on-stdin-eof"]
    if identity:
        args += ["--identity", identity]
    if initial_peers:
        args += ["--initial-peers", *initial_peers]
    proc = ManagedProcess(meshinfer_argv(*args), name="meshinfer dht")
    try:
        maddrs = [proc.read_line(timeout)]
        while (line := proc.poll_line(0.3)) is not None:  # the rest are printed in the same write
            maddrs.append(line)
    except BaseException:
        proc.stop()
        raise
    return proc, [m for m in maddrs if m.startswith("/")]
