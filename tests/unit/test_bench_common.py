"""``bench.common``: the one percentile every benchmark's p95 uses, and the parser of comma-separated counts."""

from __future__ import annotations

import pytest

from meshinfer.bench.common import parse_counts, percentile
from meshinfer.errors import ConfigError


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([5.0], 0.95, 5.0),
    ([1.0, 2.0, 3.0, 4.0, 5.0], 0.5, 3.0),
    ([1.0, 2.0, 3.0, 4.0, 5.0], 0.95, 4.8),
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0.95, 4.8),
    ([1.0, 2.0], 0.0, 1.0),
    ([1.0, 2.0], 1.0, 2.0),
    ([0.0, 10.0], 0.25, 2.5),
])
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


@pytest.mark.parametrize(("values", "q"), [([], 0.5), ([1.0], 1.5), ([1.0], -0.1)])
def test_percentile_refuses(values: list[float], q: float) -> None:
    with pytest.raises(ConfigError):
        percentile(values, q)


def test_percentile_agrees_with_the_median_and_numpy() -> None:
    import statistics

    import numpy as np

    values = [3.0, 9.0, 1.0, 7.0, 4.0, 12.0]
    assert percentile(values, 0.5) == pytest.approx(statistics.median(values))
    for q in (0.0, 0.1, 0.5, 0.9, 0.95, 1.0):
        assert percentile(values, q) == pytest.approx(float(np.quantile(values, q)))


@pytest.mark.parametrize(("text", "want"), [("1,16", [1, 16]), ("16, 1,1", [1, 16]), ("4", [4]), ("8,8", [8])])
def test_parse_counts(text: str, want: list[int]) -> None:
    assert parse_counts(text, "--x", 64) == want


@pytest.mark.parametrize(("text", "message"), [("", "--x"), ("1,y", "--x takes comma-separated positive integers"),
                                               ("0", "--x"), ("65", "--x")])
def test_parse_counts_refuses(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_counts(text, "--x", 64)
