"""Start-up throughput measurement (``meshinfer.server.throughput``) on a real span of the tiny checkpoint.

No timing is asserted: the figures must be positive and finite, the work done must be what the
contract says (counted, not timed), bad arguments are refused, and nothing is left behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch

from meshinfer.errors import ConfigError
from meshinfer.models.checkpoint import Checkpoint
from meshinfer.models.span import BlockSpan
from meshinfer.server import throughput as tp
from meshinfer.server.throughput import (
    MAX_BATCH,
    MIN_STEPS,
    WARMUP_STEPS,
    Throughput,
    measure_batch_throughput,
    measure_throughput,
    measure_throughputs,
)
from meshinfer.types import BlockRange


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One compute thread, as test servers use: on a small shared machine more threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def span(request: pytest.FixtureRequest, ckpt: Checkpoint) -> BlockSpan:
    return ckpt.load_span(BlockRange(1, 3), request.param)


class Counted:
    """Counts the span's forward calls and records the batch size of each ``forward_batch``."""

    def __init__(self, span: BlockSpan, monkeypatch: pytest.MonkeyPatch) -> None:
        self.single = 0
        self.batches: list[list[int]] = []  # per forward_batch call: T_i of each item
        real_forward, real_batch = span.forward, span.forward_batch

        def forward(*args: object, **kwargs: object) -> torch.Tensor:
            self.single += 1
            return real_forward(*args, **kwargs)  # type: ignore[arg-type]

        def forward_batch(items: list[tuple[torch.Tensor, object]]) -> list[torch.Tensor]:
            self.batches.append([int(x.shape[0]) for x, _ in items])
            return real_batch(items)  # type: ignore[arg-type]

        monkeypatch.setattr(span, "forward", forward)
        monkeypatch.setattr(span, "forward_batch", forward_batch)


@pytest.fixture
def counted(span: BlockSpan, monkeypatch: pytest.MonkeyPatch) -> Iterator[Counted]:
    yield Counted(span, monkeypatch)


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_batch_throughput_is_a_positive_rate(span: BlockSpan, batch: int) -> None:
    assert _positive(measure_batch_throughput(span, batch, steps=4))


def test_single_throughput_is_a_positive_rate(span: BlockSpan) -> None:
    assert _positive(measure_throughput(span, steps=4))


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_measure_throughputs_gives_both(span: BlockSpan, batch: int) -> None:
    got = measure_throughputs(span, batch, steps=3)
    assert isinstance(got, Throughput) and got.batch_size == batch
    assert _positive(got.single) and _positive(got.batch)
    assert got.speedup == pytest.approx(got.batch / got.single)


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_batch_steps_decode_every_session_together(span: BlockSpan, counted: Counted, batch: int) -> None:
    steps = 5
    measure_batch_throughput(span, batch, steps=steps, max_seconds=60.0)
    prefill, *decode = counted.batches
    assert len(prefill) == batch and all(t > 1 for t in prefill)  # one prompt per session
    if batch > 1:
        assert len(set(prefill)) > 1  # ragged: sessions at different lengths, as in a real step loop
    assert decode == [[1] * batch] * (WARMUP_STEPS + steps)  # each step: one token of every session


@pytest.mark.parametrize(("steps", "timed"), [(1, 1), (2, 2), (50, MIN_STEPS)])
def test_time_cap_stops_after_min_steps(span: BlockSpan, counted: Counted, steps: int, timed: int) -> None:
    # a cap that is always already exceeded: the measurement stops as soon as it has MIN_STEPS steps
    measure_batch_throughput(span, 3, steps=steps, max_seconds=1e-12)
    assert len(counted.batches) == 1 + WARMUP_STEPS + timed
    measure_throughput(span, steps=steps, max_seconds=1e-12)
    assert counted.single == 1 + WARMUP_STEPS + timed


def test_both_split_the_time_cap(span: BlockSpan, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, float] = {}

    def spy(name: str, real: Callable[..., float]) -> Callable[..., float]:
        def wrapped(*args: object, **kwargs: object) -> float:
            seen[name] = float(kwargs["max_seconds"])  # type: ignore[arg-type]
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(tp, "measure_throughput", spy("single", tp.measure_throughput))
    monkeypatch.setattr(tp, "measure_batch_throughput", spy("batch", tp.measure_batch_throughput))
    tp.measure_throughputs(span, 2, steps=2, max_seconds=0.8)
    assert seen == {"single": pytest.approx(0.4), "batch": pytest.approx(0.4)}


def test_leaves_no_state(span: BlockSpan) -> None:
    params = {k: v.clone() for k, v in span.state_dict().items()}
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    grad = torch.is_grad_enabled()
    measure_throughputs(span, 4, steps=2)
    assert torch.equal(torch.get_rng_state(), rng)  # private generator: the global RNG is untouched
    assert torch.get_num_threads() == threads and torch.is_grad_enabled() == grad
    assert not torch.is_inference_mode_enabled()
    after = span.state_dict()
    assert after.keys() == params.keys()
    assert all(torch.equal(after[k], v) for k, v in params.items())


def test_the_span_still_computes_the_same_afterwards(span: BlockSpan) -> None:
    x = torch.randn(1, 5, span.spec.hidden_size, generator=torch.Generator().manual_seed(1)).to(span.dtype)
    before = span(x, span.new_cache(8))
    measure_throughputs(span, 3, steps=2)
    assert torch.equal(span(x, span.new_cache(8)), before)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"batch": 0}, "batch must be 1"),
    ({"batch": MAX_BATCH + 1}, "batch must be 1"),
    ({"steps": 0}, "steps >= 1"),
    ({"max_seconds": 0.0}, "max_seconds > 0"),
    ({"max_seconds": -1.0}, "max_seconds > 0"),
    ({"max_seconds": math.inf}, "max_seconds > 0"),
    ({"max_seconds": math.nan}, "max_seconds > 0"),
])
def test_bad_arguments_are_refused(span: BlockSpan, counted: Counted, kwargs: dict[str, float], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        measure_batch_throughput(span, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=error):
        measure_throughputs(span, **kwargs)  # type: ignore[arg-type]
    if "batch" not in kwargs:
        with pytest.raises(ConfigError, match=error):
            measure_throughput(span, **kwargs)  # type: ignore[arg-type]
    assert counted.single == 0 and counted.batches == []  # refused before any compute


@pytest.mark.parametrize(("single", "batch", "speedup"), [
    (100.0, 500.0, 5.0),
    (200.0, 100.0, 0.5),
    (0.0, 10.0, 0.0),
])
def test_speedup(single: float, batch: float, speedup: float) -> None:
    assert Throughput(single=single, batch=batch, batch_size=8).speedup == pytest.approx(speedup)
