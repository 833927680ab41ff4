"""scripts/gpu/check.sh --cpu-dry-run: the prepared GPU check's own steps (wheels, facts, the gpu tests collected and
skipped, bench gpu on a tiny shape) run here on the CPU and leave their files under $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_check_script_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts/gpu/check.sh"), "--cpu-dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("facts: ok", "pytest -m gpu tests/gpu: ok", "bench-gpu: ok", "bench-fused: ok", "failed steps: 0"):
        assert step in summary, summary
    assert "cuda available" in (tmp_path / "facts.txt").read_text()
    assert "skipped" in (tmp_path / "pytest.log").read_text()
    results = json.loads((tmp_path / "bench-gpu.json").read_text())["results"]
    fused = json.loads((tmp_path / "bench-fused.json").read_text())["results"]
    assert fused["configs"] == {"bf16.b1.fused": {"error": "fused steps need a CUDA device"}}
    assert results["device"] == "cpu" and results["configs"]["bf16.b1.eager"]["tokens_per_s"] > 0
