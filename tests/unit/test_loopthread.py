"""``meshinfer.loopthread``: coroutines run on a loop in another thread, results, errors, timeouts, misuse."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshinfer.errors import TransportError, UsageError
from meshinfer.loopthread import LoopThread, run_on


async def _thread_name() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


async def _fail() -> None:
    raise ValueError("boom")


def test_run_returns_the_result_from_the_loop_thread() -> None:
    with LoopThread("bridge-test") as runner:
        assert runner.run(_thread_name(), timeout=5) == "bridge-test"
        assert run_on(runner.loop, _thread_name(), 5) == "bridge-test"
        assert runner.submit(_thread_name()).result(5) == "bridge-test"


def test_exceptions_reach_the_caller() -> None:
    with LoopThread() as runner, pytest.raises(ValueError, match="boom"):
        runner.run(_fail(), timeout=5)


def test_a_timeout_cancels_the_coroutine_and_raises_transport_error() -> None:
    cancelled = threading.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with LoopThread() as runner:
        with pytest.raises(TransportError, match=r"did not finish within 0\.1s"):
            runner.run(hang(), timeout=0.1)
        assert cancelled.wait(5)


def test_using_it_before_start_is_a_usage_error() -> None:
    runner = LoopThread()
    for call in (runner.run, runner.submit):
        coro = _thread_name()
        with pytest.raises(UsageError, match=r"start\(\) first"):
            call(coro)
        coro.close()
    runner.stop()  # harmless when never started
