"""``meshinfer dashboard``: flag errors (in-process, one line, exit 2) and a real process whose swarm cannot be
reached (it serves the error state and keeps trying, and stops cleanly when its stdin closes)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from meshinfer.cli.main import build_parser, main
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, wait_gone

PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.mark.parametrize(("args", "message"), [
    ([], "error: --initial-peers is required"),
    (["--initial-peers", PEER, "--port", "70000"], "error: --port must be in 0..65535, got 70000"),
    (["--initial-peers", PEER, "--interval", "0"], "error: --interval must be > 0 seconds, got 0.0"),
    (["--initial-peers", PEER, "--timeout", "-1"], "error: --timeout must be > 0 seconds, got -1.0"),
    (["--initial-peers", "not-a-multiaddr", "--port", "0"], "error: invalid initial peer 'not-a-multiaddr'"),
])
def test_bad_flags_are_one_line_errors(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["dashboard", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err and "Traceback" not in err


def test_help_lists_the_dashboard() -> None:
    help_text = build_parser().format_help()
    assert "dashboard" in help_text


def test_a_taken_http_port_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--initial-peers", PEER, "--port", str(port)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot listen on 127.0.0.1:{port}")


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_an_unreachable_swarm_is_served_as_the_error_state() -> None:
    from meshinfer.p2p.identity import Identity

    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{Identity.generate().peer_id}"  # nobody listens there
    proc = ManagedProcess(meshinfer_argv("dashboard", "--initial-peers", dead, "--port", "0", "--interval", "1",
                                         "--stop-on-stdin-eof"), name="meshinfer dashboard")
    tree: list[int] = []
    try:
        line = proc.read_line(60)
        assert line.startswith("ready "), line
        info = json.loads(line[len("ready "):])
        assert info["api"] == info["url"] + "/api/swarm" and info["metrics_url"] == info["url"] + "/metrics"
        deadline = time.monotonic() + 45
        while (status := get_json(info["url"] + "/health"))[1]["error"] in (None, "the swarm has not been read yet"):
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status[0] == 503 and "initial peer" in status[1]["error"]
        code, doc = get_json(info["api"])
        assert code == 200 and doc["error"] == status[1]["error"] and doc["models"] == []
        tree = proc.descendants()
        assert proc.proc.stdin is not None
        proc.proc.stdin.close()  # the launcher goes away: the dashboard stops by itself
        assert proc.proc.wait(timeout=30) == 0
    finally:
        tree += proc.descendants()
        proc.stop()
    assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e6


@pytest.mark.slow
def test_a_public_dashboard_warns_without_a_key_and_closes_slowloris_sockets() -> None:
    """``--host 0.0.0.0`` with no key: a warning at start. 40 slowloris sockets (a partial request head, then
    silence) are all closed within ``--header-timeout`` (2 s) plus a little, /health answers at once meanwhile,
    and the process's memory does not move."""
    from http_attacks import Slowloris, timed_get

    dead = PEER
    proc = ManagedProcess(meshinfer_argv("dashboard", "--initial-peers", dead, "--host", "0.0.0.0", "--port", "0",
                                         "--header-timeout", "2", "--no-rtt", "--stop-on-stdin-eof"),
                          name="meshinfer dashboard")
    try:
        line = proc.read_line(60)
        assert line.startswith("ready "), line
        port = int(json.loads(line[len("ready "):])["url"].rsplit(":", 1)[1])
        url = f"http://127.0.0.1:{port}"
        assert "WARNING: the dashboard listens on 0.0.0.0 (not loopback) with no API key" in proc.stderr_tail()
        before = _rss_mb(proc.pid)
        socks = Slowloris(url, count=40).open()
        try:
            status, took = timed_get(url, "/health")
            assert status in (200, 503) and took < 2
            closed = Slowloris.closed_after(socks, limit=10)
        finally:
            for sock in socks:
                sock.close()
        assert all(c is not None and 1.5 < c < 5 for c in closed), closed
        assert _rss_mb(proc.pid) < before * 1.1
        assert timed_get(url, "/api/swarm")[0] == 200  # no key: open, as before
    finally:
        proc.stop()


@pytest.mark.slow
def test_a_dashboard_with_a_key_needs_it_and_does_not_warn(tmp_path: Any) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("d-key\n")
    proc = ManagedProcess(meshinfer_argv("dashboard", "--initial-peers", PEER, "--host", "0.0.0.0", "--port", "0",
                                         "--api-key-file", str(key_file), "--no-rtt", "--stop-on-stdin-eof"),
                          name="meshinfer dashboard")
    try:
        line = proc.read_line(60)
        assert line.startswith("ready "), line
        url = "http://127.0.0.1:" + json.loads(line[len("ready "):])["url"].rsplit(":", 1)[1]
        assert "WARNING" not in proc.stderr_tail()
        for path in ("/", "/api/swarm", "/metrics"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(url + path, timeout=10)
            assert info.value.code == 401, path
            request = urllib.request.Request(url + path, headers={"Authorization": "Bearer d-key"})
            with urllib.request.urlopen(request, timeout=10) as r:
                assert r.status == 200, path
    finally:
        proc.stop()
