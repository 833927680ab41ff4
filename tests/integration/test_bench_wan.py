"""``meshinfer bench wan`` through the real CLI at a tiny size: the JSON's structure, the emulated swarm's tokens
equal to the un-emulated local engine's, servers announcing only relay ports; and Ctrl-C mid-run leaves no process
behind (relay, bootstrap, servers). No timing is asserted."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import ManagedProcess, descendants_of, meshinfer_argv, wait_gone

ROW_KEYS = {"decode_tokens_per_s", "decode_ms_per_token", "time_to_first_token_ms", "limit_ms_per_token",
            "limit_tokens_per_s", "ratio_to_limit", "extra_ms_per_token_over_limit", "ttft_delays",
            "greedy_tokens_identical_to_local", "relay", "teardown_ms", "parts", "time_to_first_token_cold_ms",
            "ttft_cold_delays"}


@pytest.mark.slow
def test_bench_wan_tiny_run(tmp_path: Path, meshinfer_cache_dir: Path) -> None:
    model = tiny_checkpoint("llama", seed=7)
    out = tmp_path / "wan.json"
    run = subprocess.run(
        meshinfer_argv("bench", "wan", "--model", str(model), "--real-model", "none", "--delays-ms", "10",
                       "--runs", "1", "--new-tokens", "8", "--prompt-tokens", "5", "--out", str(out)),
        capture_output=True, text=True, timeout=420,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert res["delays_ms"] == [0.0, 10.0] and res["speculation"] is True
    assert res["models"]["none"] == {"skipped": "--real-model none"}
    bench = res["models"]["bench"]
    assert bench["ring_hops"] == 4 and len(bench["route"]) == 3
    assert set(bench["by_delay_ms"]) == {"0", "10"}
    for row in bench["by_delay_ms"].values():
        assert ROW_KEYS <= set(row)
        assert row["greedy_tokens_identical_to_local"] is True
        assert row["decode_tokens_per_s"] > 0 and row["relay"]["nodelay"] is True
        assert row["relay"]["bytes"] > 0  # the client's traffic went through the relays
        assert row["parts"] is None or row["parts"]["ring_delays_ms"] in (0.0, 40.0)
        spec = row["speculation"]  # the edit prompt without and with speculation, side by side
        assert spec["greedy_tokens_identical"] is True and spec["spec_decode_tokens_per_s"] > 0
        assert spec["tokens_per_trip"] >= 1 and spec["spec_limit_ms_per_token"] <= row["limit_ms_per_token"]
    assert bench["by_delay_ms"]["10"]["limit_ms_per_token"] == pytest.approx(
        bench["by_delay_ms"]["0"]["decode_ms_per_token"] + 40.0)
    assert "bench:" in run.stderr and "ratio" in run.stderr  # the side-by-side table
    assert "spec/plain" in run.stderr


@pytest.mark.slow
def test_bench_wan_ctrl_c_leaves_nothing(meshinfer_cache_dir: Path, tmp_path: Path) -> None:
    model = tiny_checkpoint("llama", seed=7)
    bench = ManagedProcess(meshinfer_argv("bench", "wan", "--model", str(model), "--real-model", "none",
                                          "--delays-ms", "50", "--runs", "3", "--new-tokens", "40",
                                          "--out", str(tmp_path / "wan.json")), name="meshinfer bench wan")
    try:
        deadline = time.monotonic() + 300
        while "one-way delay" not in bench.stderr_tail(200) and time.monotonic() < deadline:
            assert bench.alive(), bench.stderr_tail()
            time.sleep(0.2)
        children = descendants_of(bench.pid)
        assert len(children) >= 5  # relay, bootstrap (+ its p2pd), 3 servers
        bench.kill(signal.SIGINT)
        bench.proc.wait(timeout=60)
        assert wait_gone(children, 30) == []
    finally:
        bench.stop()
