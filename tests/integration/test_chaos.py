"""``meshinfer bench chaos`` as a real, bounded run on a tiny model: servers are killed (SIGKILL or SIGTERM) and
restarted while generations run; every generation must complete with the local engine's exact tokens, and no
process may outlive the run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv

pytestmark = pytest.mark.slow


def test_bench_chaos_generations_survive_kills_unchanged(tmp_path: Path, meshinfer_cache_dir: Path) -> None:
    model = tiny_checkpoint("llama", seed=7)
    out = tmp_path / "chaos.json"
    run = subprocess.run(
        meshinfer_argv("bench", "chaos", "--model", str(model), "--servers", "4", "--generations", "8",
                       "--new-tokens", "120", "--kill-every", "200", "--max-kills", "3", "--seed", "5",
                       "--signals", "kill", "--time-limit", "240", "--out", str(out)),
        capture_output=True, text=True, timeout=420,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert res["generations_run"] == 8
    assert res["generations_completed"] == 8, res["errors"]
    assert res["generations_identical"] == 8
    assert 1 <= res["kills"] <= 3 and not res["restart_errors"]
    assert res["failovers"] >= 1  # SIGKILLed servers were on the generation's route
    assert set(res["kill_signals"]) == {"SIGKILL"}
    assert res["failover_seconds"]["median"] is not None and res["failover_seconds"]["median"] >= 0
