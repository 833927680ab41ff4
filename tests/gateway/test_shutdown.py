"""Stopping an in-process gateway leaves no thread behind: ``ApiServer.stop`` runs the app's shutdown hooks
(uvicorn's lifespan is off), which stop the parse worker thread and whatever a caller registered (e.g. an
``AutoLoader``'s background refresh), whether uvicorn ran on its own thread or on another thread's loop."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from gateway_helpers import FakeGenerator, ids

from meshinfer.gateway.app import create_app
from meshinfer.gateway.autoload import AutoLoader
from meshinfer.gateway.serving import ApiServer, shutdown_app
from meshinfer.loopthread import LoopThread

_BEFORE: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _only_new_threads() -> None:
    """Threads other tests left (apps driven through httpx's ASGI transport are never shut down) do not count."""
    _BEFORE.clear()
    _BEFORE.update(threading.enumerate())


def _threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith(prefix) and t.is_alive() and t not in _BEFORE]


def _exercise(server: ApiServer) -> None:
    """One request per model, so the parse worker thread runs."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for model in ("fake", "other"):
            body = {"model": model, "prompt": "p", "max_tokens": 3}
            assert client.post("/v1/completions", json=body).status_code == 200


def test_stop_ends_the_parse_worker_and_the_server_thread() -> None:
    app = create_app(FakeGenerator(ids("abc")), "fake", more={"other": FakeGenerator(ids("xyz"))})
    with ApiServer(app) as server:
        _exercise(server)
        assert _threads("meshinfer-gateway-parse")  # one worker, shared by both models
        assert len(_threads("meshinfer-gateway-parse")) == 1
    assert _threads("meshinfer-gateway-parse") == []
    assert _threads(f"meshinfer-api:{server.port}") == []
    assert app.state.shutdown_hooks == []  # run once


def test_stop_on_another_loop_runs_async_hooks_and_keeps_the_loop() -> None:
    """Served on a loop of another thread (as `meshinfer api` does): the hooks run there, an ``AutoLoader``'s
    refresh task is stopped by its ``aclose`` hook, and the loop itself keeps running."""
    runner = LoopThread("test-gateway-shutdown").start()
    try:
        app = create_app(FakeGenerator(ids("abc")), "fake", more={"other": FakeGenerator(ids("xyz"))})

        async def listing() -> list[object]:
            return []

        loader = AutoLoader(app.state.models, lambda model_id, name: app.state.gateway, listing,  # never called
                            max_models=1, refresh_s=0.05)

        async def start_loader() -> None:
            loader.start()

        runner.run(start_loader(), timeout=10)
        app.state.shutdown_hooks.append(loader.aclose)
        with ApiServer(app, loop=runner.loop) as server:
            _exercise(server)
            assert _threads("meshinfer-gateway-parse")

        async def auto_tasks() -> list[str]:
            return [t.get_name() for t in asyncio.all_tasks() if t.get_name() == "meshinfer-api-auto-models"]

        assert runner.run(auto_tasks(), timeout=10) == []
        assert _threads("meshinfer-gateway-parse") == []
        assert runner.run(asyncio.sleep(0, result="alive"), timeout=5) == "alive"
    finally:
        runner.stop()


def test_shutdown_app_is_idempotent_and_the_worker_restarts_on_use() -> None:
    """A hook that fails does not stop the others; a gateway used after shutdown starts a fresh worker."""
    app = create_app(FakeGenerator(ids("abc")), "fake")
    ran: list[str] = []

    def failing() -> None:
        ran.append("failing")
        raise RuntimeError("boom")

    app.state.shutdown_hooks.append(failing)

    async def main() -> None:
        assert await app.state.gateway.offload(lambda: 1 + 1) == 2
        await shutdown_app(app)
        await shutdown_app(app)
        assert ran == ["failing"] and _threads("meshinfer-gateway-parse") == []
        assert await app.state.gateway.offload(lambda: 3) == 3  # a fresh worker
        await shutdown_app(app)  # the hooks were consumed: this one does nothing
        app.state.gateway.close()

    asyncio.run(main())
    assert _threads("meshinfer-gateway-parse") == []
