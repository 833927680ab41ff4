"""``meshinfer serve`` as a command: bad flags are one-line errors; SIGTERM is a clean, quick stop."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from server_helpers import Client, Swarm, launch_server, stop_and_check, wait_ready, wait_until

from meshinfer.cli.main import main
from meshinfer.p2p.announce import read_coverage
from meshinfer.testing.procs import meshinfer_argv, wait_gone
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Error, ErrorCode


@pytest.mark.parametrize(("flags", "text"), [
    (["--blocks", "0:9"], "lies outside the model"),
    (["--blocks", "3:1"], "invalid block range"),
    (["--blocks", "0:2", "--dtype", "int8"], "unknown dtype"),
    (["--blocks", "0:2", "--cache-tokens", "0"], "--cache-tokens must be > 0"),
    (["--blocks", "0:2", "--torch-threads", "0"], "--torch-threads must be > 0"),
    (["--blocks", "0:2", "--model", "/nonexistent/model"], "does not exist"),
    (["--blocks", "0:2", "--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--blocks", "0:2", "--device", "cuda"], "--device cuda: "),  # this suite runs where torch sees no GPU
])
def test_bad_flags_are_one_line_errors(tiny_llama: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                       text: str) -> None:
    argv = ["serve", "--model", str(tiny_llama), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and text in err and "\n" not in err, err


@pytest.mark.slow
def test_bad_flags_exit_2_as_a_process(tiny_llama: Path) -> None:
    out = subprocess.run(meshinfer_argv("serve", "--model", str(tiny_llama), "--blocks", "2:7"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "4 blocks" in out.stderr


@pytest.mark.slow
def test_a_missing_gpu_is_one_line_and_exit_2_as_a_process(tiny_llama: Path) -> None:
    out = subprocess.run(meshinfer_argv("serve", "--model", str(tiny_llama), "--blocks", "0:2", "--device", "cuda"),
                         capture_output=True, text=True, timeout=120)
    err = out.stderr.strip()
    assert out.returncode == 2 and out.stdout == "" and err.splitlines() == [err], err
    assert err.startswith("error: --device cuda: ") and "use --device cpu" in err and "Traceback" not in err


@pytest.mark.slow
def test_sigterm_drains_and_exits_cleanly(swarm: Swarm, client: Client) -> None:
    proc = launch_server(str(swarm.model_dir), "0:4", swarm.bootstrap, "--public-name", "short-lived",
                         "--torch-threads", "2", "--drain-timeout", "1")
    try:
        server = wait_ready(proc)
        assert server.info["torch_threads"] == 2  # the flag reached torch.set_num_threads
        sess = client.open(server, BlockRange(1, 4), max_length=32)
        assert wait_until(lambda: client.cache_tokens_left(server, 4) == 16384 - 32, 20)
        kids = proc.descendants()
        assert kids, "a running server has its p2pd child"
        started = time.monotonic()
        proc.kill(signal.SIGTERM)
        code = proc.proc.wait(timeout=20)
        elapsed = time.monotonic() - started
    finally:
        stop_and_check([proc])
    assert code == 0, proc.stderr_tail()
    assert elapsed < 10, f"stopping took {elapsed:.1f}s"
    assert not wait_gone(kids, 10), "p2pd outlived its server"
    err = sess.recv(timeout=10)  # the open session was told, not just dropped
    assert isinstance(err, Error) and err.code == ErrorCode.OVERLOADED and "shutting down" in err.message
    assert err.session_id == sess.session_id
    record = client.run(read_coverage(client.node, server.model_id, 4), 30).servers.get(server.peer_id)
    assert record is not None and record.state == "draining"  # announced on the way out, expires by itself
    assert "stopped" in proc.stderr_tail()
