"""The page's empty, error, recovery and offline states in real headless Chromium, over in-process dashboards
whose swarm is scripted (a fixed payload, or a real ``SwarmPoller`` with a scripted reader): no swarm needed."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest

from meshinfer.dashboard.app import StaticSource, create_app
from meshinfer.dashboard.doc import dashboard_payload
from meshinfer.dashboard.poller import SwarmPoller
from meshinfer.errors import TransportError
from meshinfer.gateway.serving import ApiServer
from meshinfer.loopthread import LoopThread

pytestmark = pytest.mark.slow

NASTY = '<img src=x onerror="window.pwned=1">'


class FlakyReader:
    """Fails ``failures`` reads, then serves one model with one server (whose name is an HTML injection)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    @property
    def viewer(self) -> str:
        return "QmViewer"

    async def read(self) -> dict[str, Any]:
        if self.failures > 0:
            self.failures -= 1
            raise TransportError("the DHT is on fire")
        server = {"peer_id": "QmServerA", "span": "0:3", "state": "online", "throughput": 42.0,
                  "cache_tokens_left": 1000, "sessions": 0, "queued_steps": 0, "software_version": "0.1.0",
                  "public_name": NASTY, "addresses": [], "direct_addresses": []}
        model = {"model_id": "m" * 32, "name": "tiny", "family": "llama", "num_blocks": 5, "hidden_size": 8,
                 "dtype": "float32", "manifest_hash": None, "announced_by": 1, "block_servers": [1, 1, 1, 0, 0],
                 "block_throughput": [42.0, 42.0, 42.0, 0.0, 0.0], "missing_blocks": [3, 4], "complete": True,
                 "servers": [server]}
        return {"models": [model], "complete": True}

    async def ping(self, server: Mapping[str, Any]) -> float:
        return 0.0015

    async def close(self) -> None:
        return None


def test_empty_swarm(page: Any) -> None:
    payload = dashboard_payload({"models": [], "complete": True}, updated_at=time.time(), checked_at=time.time())
    with ApiServer(create_app(StaticSource(payload))) as server:
        page.goto(server.url)
        page.wait_for_function("document.body.dataset.state === 'empty'", timeout=10_000)
        assert "no models are being served" in page.inner_text("#empty")
        assert page.locator("#error").is_hidden() and page.locator("#servers-section").is_hidden()
        assert page.locator(".coverage .cell").count() == 0


def test_error_then_recovery_without_reloading_then_offline(page: Any) -> None:
    joins = [TransportError("cannot join the swarm: no initial peer answered (bootstrap failed)")]

    async def connect() -> FlakyReader:
        if joins:
            raise joins.pop()
        return FlakyReader(failures=6)

    poller = SwarmPoller(connect, interval=0.5)
    runner = LoopThread("states-test").start()
    try:
        with ApiServer(create_app(poller)) as server:
            page.goto(server.url)
            page.wait_for_function("window.meshinfer.renders >= 1", timeout=10_000)
            assert page.get_attribute("body", "data-state") == "loading"  # not read yet: neither empty nor error
            assert page.locator("#empty").is_hidden() and page.locator("#error").is_hidden()
            poller.start(runner.loop)  # from now on: a failed join, failed reads for a while, then the swarm
            page.wait_for_function("document.body.dataset.state === 'error'", timeout=10_000)
            assert page.inner_text("#error") in ("cannot reach the swarm: no initial peer answered (bootstrap failed)",
                                                 "cannot reach the swarm: the DHT is on fire")
            assert page.locator("#empty").is_hidden()
            page.wait_for_function("document.body.dataset.state === 'ok'", timeout=15_000)
            assert page.locator("#error").is_hidden()
            assert [int(x) for x in page.eval_on_selector_all(
                ".coverage .cell", "els => els.map(e => e.dataset.servers)")] == [1, 1, 1, 0, 0]
            assert page.locator(".coverage .cell.hole").count() == 2
            assert "missing blocks 3–4" in page.inner_text(".model .meta")
            assert page.inner_text("#servers tbody tr td:nth-child(2)") == NASTY  # shown as text, not run
            assert page.evaluate("window.pwned === undefined") and page.locator("#servers img").count() == 0
            page.wait_for_function("document.querySelector('#servers tbody td:last-child').textContent === '1.50 ms'",
                                   timeout=10_000)
            renders = page.evaluate("window.meshinfer.renders")
            assert renders >= 2 and page.evaluate("window.meshinfer.polls") >= renders
        # the dashboard is gone: the page says so instead of showing stale data as live
        page.wait_for_function("document.body.dataset.state === 'offline'", timeout=10_000)
        assert page.inner_text("#error").startswith("cannot reach the dashboard server")
    finally:
        poller.stop()
        runner.stop()
