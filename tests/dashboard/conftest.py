"""Fixtures for dashboard tests: a headless Chromium driven by Playwright, and a bootstrap peer.

Every test module that needs a swarm gets its own bootstrap peer. The browser is Debian's ``chromium``
(``/usr/bin/chromium``; ``scripts/dev.sh test`` installs it with apt-get when it can). Browser tests are
skipped, with the reason, only when Playwright or Chromium cannot be found. Every process is started
through ``meshinfer.testing`` helpers and stopped by PID at teardown.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from dashboard_helpers import CHROMIUM

from meshinfer.testing.procs import start_dht, wait_gone


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright's sync API) for one test module. Module-scoped on purpose: while
    Playwright's sync API runs, this thread counts as running an event loop, so ``asyncio.run`` in later
    tests (of any directory) would fail if it outlived the module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; it is in the dev extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Chromium not found at {CHROMIUM}: install Debian's chromium "
                    "(scripts/dev.sh test does it: apt-get install -y chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A fresh page of the module's Chromium, closed after the test."""
    page = chromium.new_page()
    try:
        yield page
    finally:
        page.close()


@pytest.fixture(scope="module")
def dash_bootstrap() -> Iterator[list[str]]:
    """Multiaddrs of a ``meshinfer dht`` bootstrap peer of one test module (each module its own swarm, so one
    module's records never show on another's page)."""
    dht, maddrs = start_dht(timeout=90)
    tree = dht.descendants()
    try:
        yield maddrs
    finally:
        dht.stop(timeout=10)
        assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"
