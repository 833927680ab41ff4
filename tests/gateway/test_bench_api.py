"""``meshinfer bench api``: its pure figures, and one small run on a tiny checkpoint (its own 3-server swarm)."""

from __future__ import annotations

import argparse

import pytest

from meshinfer.bench import api
from meshinfer.errors import ConfigError


@pytest.mark.parametrize(("text", "want"), [("1,16", [1, 16]), ("16, 1,1", [1, 16]), ("4", [4])])
def test_parse_levels(text: str, want: list[int]) -> None:
    assert api.parse_levels(text) == want


@pytest.mark.parametrize("text", ["", "0", "1,x", "2000", "-1"])
def test_parse_levels_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--concurrency"):
        api.parse_levels(text)


def test_summarise_level() -> None:
    samples = [api.RequestSample(0.1, 1.0, 10), api.RequestSample(0.3, 2.0, 20), api.RequestSample(0.2, 1.5, 30),
               api.RequestSample(0.0, 0.1, 0, "HTTP 503: busy")]
    out = api.summarise_level(samples, wall_s=4.0, concurrency=2)
    assert (out["requests"], out["failed"], out["concurrency"]) == (4, 1, 2)
    assert out["requests_per_s"] == pytest.approx(3 / 4.0)
    assert out["completion_tokens_per_s"] == pytest.approx(60 / 4.0)
    assert out["mean_completion_tokens"] == pytest.approx(20.0)
    assert out["time_to_first_token_ms"] == pytest.approx({"median": 200.0, "p95": 290.0})
    assert out["latency_ms"] == pytest.approx({"median": 1500.0, "p95": 1950.0})
    assert out["errors"] == ["HTTP 503: busy"]
    # decode rates (tokens after the first over first -> end): 9/0.9 = 10, 19/1.7 = 11.2, 29/1.3 = 22.3; C x median
    assert out["decode_tokens_per_s"] == pytest.approx(2 * 19 / 1.7)


def test_summarise_level_all_failed() -> None:
    out = api.summarise_level([api.RequestSample(0.0, 0.1, 0, "boom")], wall_s=1.0, concurrency=1)
    assert out["failed"] == 1 and "requests_per_s" not in out and out["errors"] == ["boom"]


@pytest.mark.slow
def test_bench_api_smoke() -> None:
    from meshinfer.testing.checkpoints import tiny_checkpoint

    parser = argparse.ArgumentParser()
    api.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_checkpoint("llama")), "--concurrency", "1,4", "--requests", "4",
                              "--max-tokens", "4", "--extras", "none"])
    with pytest.raises(ConfigError, match="--requests"):
        api.run(parser.parse_args(["--concurrency", "1,16", "--requests", "4"]))
    out = api.run(args)
    assert out["servers"] == ["0:2", "2:3", "3:4"] and out["max_tokens"] == 4
    assert set(out["levels"]) == {"c1", "c4"}
    for c, level in ((1, out["levels"]["c1"]), (4, out["levels"]["c4"])):
        assert (level["concurrency"], level["requests"], level["failed"]) == (c, 4, 0), level
        assert level["requests_per_s"] > 0 and 0 < level["mean_completion_tokens"] <= 4
        ttft = level["time_to_first_token_ms"]
        assert 0 < ttft["median"] <= ttft["p95"] <= level["latency_ms"]["p95"]
    assert out["speedup_vs_1"] == out["levels"]["c4"]["speedup_vs_1"] and out["levels"]["c1"]["speedup_vs_1"] == 1.0
    assert out["decode_speedup_vs_1"] == out["levels"]["c4"]["decode_speedup_vs_1"]


def test_add_speedups() -> None:
    levels = {"c1": {"concurrency": 1, "completion_tokens_per_s": 10.0},
              "c4": {"concurrency": 4, "completion_tokens_per_s": 35.0},
              "c16": {"concurrency": 16, "completion_tokens_per_s": 55.0},
              "c32": {"concurrency": 32, "failed": 3}}
    assert api.add_speedups(levels) == pytest.approx(5.5)
    assert [levels[k].get("speedup_vs_1") for k in ("c1", "c4", "c16", "c32")] == pytest.approx([1.0, 3.5, 5.5, None])
    assert api.add_speedups({"c1": {"concurrency": 1, "failed": 1}}) is None
    decoding = {"c1": {"concurrency": 1, "completion_tokens_per_s": 10.0, "decode_tokens_per_s": 20.0},
                "c16": {"concurrency": 16, "completion_tokens_per_s": 40.0, "decode_tokens_per_s": 110.0}}
    assert api.add_speedups(decoding) == pytest.approx(4.0)
    assert decoding["c16"]["decode_speedup_vs_1"] == pytest.approx(5.5)
