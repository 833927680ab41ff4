"""``meshinfer bench trust`` as a real, small run on a tiny model: the JSON has every figure, the honest swarm's
audits find nothing, a liar lying on every step is caught and the output stays the honest one; ``--modes``
parsing and the Wilson interval (no processes)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from meshinfer.bench.trust import can_pin, parse_modes
from meshinfer.bench.trust_stats import rate_summary, wilson
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


def test_wilson_interval() -> None:
    # published values (e.g. statsmodels proportion_confint(method="wilson")): 5/10 -> (0.2366, 0.7634)
    assert wilson(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson(100, 100) == pytest.approx((0.963007, 1.0), abs=1e-6)  # 100/100 cannot show >= 99% at 95%
    assert wilson(0, 20)[0] == 0.0 and wilson(0, 0) == (0.0, 1.0)
    s = rate_summary(99, 100, predicted=0.99, target=0.99)
    assert s["predicted_in_ci95"] and s["target_met_observed"] and not s["target_met_at_ci95_low"]
    with pytest.raises(ValueError):
        wilson(3, 2)


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


@pytest.mark.slow
def test_bench_trust_honest_steps_pin_and_first_span_liar(tmp_path: Path, meshinfer_cache_dir: Path) -> None:
    """``--honest-steps`` on a swarm mixing fp32 and bf16 servers finds no false positive; ``--pin`` measures the
    overhead again with the route on CPU 0 and the other servers on CPU 1 (or says why it cannot); a liar of the
    first span (``--liar-span A``) is caught."""
    model = tiny_checkpoint("llama", seed=7)
    out = tmp_path / "trust.json"
    run = subprocess.run(
        meshinfer_argv("bench", "trust", "--model", str(model), "--runs", "1", "--max-tokens", "20",
                       "--new-tokens", "16", "--repeats", "1", "--prompt-tokens", "6", "--modes", "wrong",
                       "--liar-span", "A", "--honest-steps", "60", "--honest-clients", "2", "--pin",
                       "--time-limit", "300", "--out", str(out)),
        capture_output=True, text=True, timeout=480,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    d = res["detection"]["wrong@1"]
    assert res["liar_span"] == "A" and d["span"] == "0:2" and d["detected"] == 1 and d["outputs_exact"] == 1
    assert d["caught_within_max_tokens"]["ci95_low"] < 1.0 == d["caught_within_max_tokens"]["ci95_high"]
    honest = res["honest"]
    assert honest["audited_decode_steps"] >= 60 and honest["errors"] == []
    assert honest["false_positives"] == 0 and honest["any_false_positive"] is False
    assert honest["windows_passed"] > 0 and honest["positions_verified"] > 0
    assert set(honest["dtype_of_peer"].values()) == {"fp32", "bf16"}
    pairs = honest["by_dtype_pair"]
    assert "float32/float32" in pairs and any("bfloat16" in pair for pair in pairs)
    for pair in pairs.values():
        assert pair["failed"] == 0 and pair["max_rel_err"] <= pair["tol_rel_err"]
    assert 0 < res["extra_compute"]["ratio"] <= 2.0
    why = can_pin()
    if why is not None:
        assert res["pinned"] == {"skipped": why}
        pytest.skip(f"--pin: {why}")
    pinned = res["pinned"]
    assert pinned["cpus"] == {"client_and_route": [0], "other_servers": [1]}
    assert pinned["overhead"]["tokens_per_s_audited"] > 0 and len(pinned["overhead"]["route"]) == 2
