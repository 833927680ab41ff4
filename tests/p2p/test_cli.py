"""``meshinfer dht``, ``meshinfer swarm`` and ``meshinfer bench transport``.

Long-running commands run as real processes; error paths call ``meshinfer.cli.main.main`` in-process
(the same code, without paying an interpreter start each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshinfer.cli.main import main
from meshinfer.testing.procs import ManagedProcess, command_line, meshinfer_argv, start_dht, wait_gone


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshinfer_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def error_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert lines, out
    return lines[-1]


def main_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[tuple[ManagedProcess, list[str]]]:
    proc, maddrs = start_dht(timeout=90)
    try:
        yield proc, maddrs
    finally:
        children = proc.descendants()
        proc.stop()
        assert wait_gone(children, timeout=10) == []


@pytest.mark.slow
def test_dht_prints_maddrs_of_its_own_peer(bootstrap: tuple[ManagedProcess, list[str]]) -> None:
    _, maddrs = bootstrap
    assert maddrs and all(m.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/Qm" in m for m in maddrs)
    assert len({m.rsplit("/p2p/", 1)[1] for m in maddrs}) == 1


@pytest.mark.slow
def test_swarm_on_an_empty_swarm(bootstrap: tuple[ManagedProcess, list[str]],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _, maddrs = bootstrap
    doc = run_cli("swarm", "--initial-peers", *maddrs, "--json", "--timeout", "3")
    assert doc.returncode == 0, doc.stderr
    assert json.loads(doc.stdout) == {"models": [], "complete": True}
    code, out, _ = main_in_process(capsys, "swarm", "--initial-peers", *maddrs)
    assert code == 0 and "no models are being served" in out


@pytest.mark.parametrize(("args", "message"), [
    (["swarm", "--no-mdns"], "error: --initial-peers is required"),
    (["swarm", "--initial-peers", "not-a-multiaddr"], "error: invalid initial peer multiaddr"),
    (["swarm", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"],
     "error: cannot reach any initial peer"),
    (["dht", "--port", "70000"], "error: --port must be in 0..65535"),
    (["dht", "--host", "localhost"], "error: --host must be an IP address"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = main_in_process(capsys, *args)
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith(message), err


def test_dht_bad_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "bad.key"
    key.write_bytes(b"not a key")
    key.chmod(0o600)
    code, _, err = main_in_process(capsys, "dht", "--identity", str(key))
    assert code == 2 and err.startswith("error: unreadable peer key"), err
    key.chmod(0o644)
    code, _, err = main_in_process(capsys, "dht", "--identity", str(key))
    assert code == 2 and "chmod 600" in err, err
    code, _, err = main_in_process(capsys, "dht", "--identity", str(tmp_path / "no" / "such.key"))
    assert code == 2 and "does not exist" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_dht_stops_on_signals_and_leaves_no_p2pd(sig: int, tmp_path: Path) -> None:
    key = tmp_path / "dht.key"
    proc, maddrs = start_dht(identity=str(key), timeout=90)
    try:
        children = proc.descendants()
        assert any("p2pd" in command_line(pid) for pid in children), children
        assert oct(key.stat().st_mode & 0o777) == oct(0o600)
        proc.kill(sig)
        code = proc.proc.wait(timeout=20)
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), proc.stderr_tail()
        assert wait_gone(children, timeout=10) == []
    finally:
        proc.stop()
    if sig == signal.SIGKILL:  # even after SIGKILL, the identity can be used again at once
        again, maddrs2 = start_dht(identity=str(key), timeout=90)
        try:
            assert maddrs2[0].rsplit("/p2p/", 1)[1] == maddrs[0].rsplit("/p2p/", 1)[1]
        finally:
            again.stop()


@pytest.mark.slow
def test_dht_started_by_a_launcher_stops_when_the_launcher_goes_away() -> None:
    proc, _ = start_dht(timeout=90)  # with --stop-on-stdin-eof: its stdin is our pipe
    try:
        children = proc.descendants()
        assert proc.proc.stdin is not None
        proc.proc.stdin.close()  # what a launcher's death does to the pipe
        assert proc.proc.wait(timeout=20) == 0, proc.stderr_tail()
        assert wait_gone(children, timeout=10) == []
    finally:
        proc.stop()


@pytest.mark.slow
def test_bench_transport_writes_json(tmp_path: Path) -> None:
    out_path = tmp_path / "transport.json"
    out = run_cli("bench", "transport", "--small-rounds", "20", "--medium-rounds", "5", "--bulk-mib", "2",
                  "--bulk-rounds", "2", "--out", str(out_path))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out_path.read_text())
    for plane in ("libp2p", "direct"):  # both transports measured, each over a real stream
        res = doc["results"][plane]
        assert res["rtt_8KiB"]["n"] == 20 and res["rtt_256KiB"]["n"] == 5 and res["bulk_2MiB"]["n"] == 2
        for key in ("rtt_8KiB", "rtt_256KiB", "bulk_2MiB"):
            assert 0 < res[key]["min_ms"] <= res[key]["median_ms"] <= res[key]["p99_ms"]
        assert res["bulk_2MiB"]["mb_per_s"] > 0
    assert "direct plane" in doc["results"]["direct"]["setup"]
