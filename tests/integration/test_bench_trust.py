"""``meshinfer bench trust`` as a real, small run on a tiny model: the JSON has every figure, the honest swarm's
audits find nothing, a liar lying on every step is caught and the output stays the honest one; ``--modes``
parsing (no processes)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from meshinfer.bench.trust import parse_modes
from meshinfer.errors import ConfigError
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv


def test_parse_modes() -> None:
    liars = parse_modes("noise:0.5, scale,skip-block", seed=3)
    assert [(c.mode, c.effective_rate, c.seed) for c in liars] == [("noise", 0.5, 3), ("scale", 1.0, 3),
                                                                   ("skip-block", 1.0, 3)]
    for bad in ("", "lies", "noise:x", "noise:2"):
        with pytest.raises(ConfigError, match="--modes"):
            parse_modes(bad)


@pytest.mark.slow
def test_bench_trust_cpu_smoke(tmp_path: Path, meshinfer_cache_dir: Path) -> None:
    model = tiny_checkpoint("llama", seed=7)
    out = tmp_path / "trust.json"
    run = subprocess.run(
        meshinfer_argv("bench", "trust", "--model", str(model), "--runs", "1", "--max-tokens", "20",
                       "--new-tokens", "16", "--repeats", "1", "--prompt-tokens", "6", "--modes", "wrong,noise:1.0",
                       "--time-limit", "240", "--out", str(out), "--json"),
        capture_output=True, text=True, timeout=420,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")] == [res]
    over = res["overhead"]
    assert over["tokens_per_s_audited"] > 0 and over["tokens_per_s_unaudited"] > 0
    assert over["ratio_median"] == pytest.approx(over["tokens_per_s_audited"] / over["tokens_per_s_unaudited"])
    assert {"slowdown", "target_slowdown", "target_met", "ratios"} <= set(over)
    audit = res["audit_bytes"]
    assert audit["positions_verified"] > 0 and audit["per_generated_token"] > 0
    assert audit["detections_on_honest_swarm"] == 0 and audit["unresolved_on_honest_swarm"] == 0
    assert set(res["detection"]) == {"wrong@1", "noise@1"}
    for d in res["detection"].values():
        assert d["runs"] == 1 and d["liar_on_route"] == 1 and d["errors"] == []
        assert d["detected"] == 1 and d["detection_rate"] == 1.0 and d["predicted_detection_rate"] == 1.0
        assert 0 <= d["tokens_to_detection"][0] <= 20 and d["outputs_exact"] == 1
    assert res["all_outputs_exact"] is True
