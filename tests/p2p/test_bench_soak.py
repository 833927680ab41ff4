"""``meshinfer bench soak`` as a real run of a few seconds on a tiny model: generations stay exact, every plane
is connected to and disconnected from, and every process started is measured and gives its memory and
descriptors back (within 5% of its warm figures)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv

pytestmark = pytest.mark.slow


def test_bench_soak_gives_memory_and_descriptors_back(tmp_path: Path, meshinfer_cache_dir: Path) -> None:
    model = tiny_checkpoint("llama", seed=7)
    out = tmp_path / "soak.json"
    run = subprocess.run(
        meshinfer_argv("bench", "soak", "--model", str(model), "--servers", "2", "--minutes", "0.15",
                       "--cycles", "3", "--new-tokens", "4", "--out", str(out)),
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert res["generations_after_warmup"] >= 1 and res["generations_identical"] == res["generations"], res
    connects = res["connects"]
    assert connects["failed"] == 0, connects
    assert min(connects[k] for k in ("direct_tls", "direct_plain", "libp2p", "tcp_tls_port", "sessions")) >= 1
    assert len(res["processes"]) == 3  # the bootstrap and both servers
    for role, figures in res["processes"].items():
        assert all(figures[when]["rss_mb"] > 0 and figures[when]["fds"] > 0 for when in ("start", "warm", "end"))
        assert figures["back_within_5pct"], (role, figures)
    assert res["verdict"] == {"back_within_5pct": True, "all_identical": True}
