"""``bench.swarm_private.compare``: the plain and the private split side by side (pure arithmetic)."""

from __future__ import annotations

import pytest

from meshinfer.bench.swarm_private import compare


def _figures(tokens_per_s: float, ttft_ms: float, ms_per_token: float) -> dict[str, float]:
    return {"decode_tokens_per_s": tokens_per_s, "time_to_first_token_ms": ttft_ms,
            "decode_ms_per_token_mean": ms_per_token}


def test_compare_puts_the_splits_side_by_side() -> None:
    out = compare(k=1, plain=_figures(10.0, 200.0, 100.0), private=_figures(8.0, 300.0, 125.0),
                  plain_route_ms=90.0, private_route_ms=80.0, local_blocks=30.0, identical=True,
                  private_route=["1:4", "4:8", "8:11"], weight_bytes=1000, cache_bytes=10)
    assert out["plain"]["client_ms_per_token"] == pytest.approx(10.0)
    assert out["private"]["client_ms_per_token"] == pytest.approx(45.0)
    assert out["private_over_plain"] == pytest.approx({"decode_tokens_per_s": 0.8, "time_to_first_token": 1.5})
    paired = compare(k=1, plain=_figures(1, 1, 1), private=_figures(1, 1, 1), plain_route_ms=None,
                     private_route_ms=None, local_blocks=0.0, identical=True, private_route=[], weight_bytes=0,
                     cache_bytes=0, paired=[0.5, 0.9, 0.7])
    assert paired["private_over_plain"]["decode_paired_median"] == pytest.approx(0.7)
    assert out["extra_ms_per_token"] == pytest.approx(25.0)
    assert out["extra_client_ms_per_token"] == pytest.approx(35.0)
    assert out["route_ms_saved_per_token"] == pytest.approx(10.0)
    assert (out["private_blocks"], out["greedy_tokens_identical"], out["private_route"]) == (1, True,
                                                                                            ["1:4", "4:8", "8:11"])


def test_compare_without_route_figures_leaves_the_client_split_out() -> None:
    out = compare(k=2, plain=_figures(10.0, 200.0, 100.0), private=_figures(10.0, 200.0, 100.0),
                  plain_route_ms=None, private_route_ms=None, local_blocks=1.0, identical=False,
                  private_route=["2:6"], weight_bytes=0, cache_bytes=0)
    assert "client_ms_per_token" not in out["private"] and "extra_client_ms_per_token" not in out
