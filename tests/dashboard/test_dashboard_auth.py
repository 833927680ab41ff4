"""The dashboard behind a key (``dashboard.auth``): the page, its JSON and its metrics need a bearer header or the
sign-in cookie; ``/health`` stays open; without a key nothing changes (FastAPI's test client, no network)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from meshinfer.dashboard.app import StaticSource, create_app
from meshinfer.dashboard.auth import SESSION_COOKIE, KeyGuard
from meshinfer.dashboard.page import PAGE_HTML

PAYLOAD = {"models": [], "totals": {"models": 0, "servers": 0}, "error": None, "updated_at": 1.0}


def client(api_key: str | None) -> TestClient:
    return TestClient(create_app(StaticSource(PAYLOAD), api_key=api_key))


def test_without_a_key_everything_is_open() -> None:
    c = client(None)
    assert c.get("/").text == PAGE_HTML
    assert c.get("/api/swarm").status_code == 200 and c.get("/metrics").status_code == 200


@pytest.mark.parametrize("path", ["/", "/api/swarm", "/metrics"])
def test_with_a_key_each_route_needs_it(path: str) -> None:
    c = client("s3cret")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic s3cret"},
                    {"Cookie": f"{SESSION_COOKIE}=s3cret"}, {"Cookie": "garbage;;=\x7f"}):
        r = c.get(path, headers=headers)
        assert r.status_code == 401 and PAGE_HTML not in r.text, (path, headers)
    assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/health").status_code == 200  # open: counts and the last error only


def test_a_browser_signs_in_once_with_the_form() -> None:
    c = client("s3cret")
    page = c.get("/")
    assert page.status_code == 401 and 'action="login"' in page.text and 'type="password"' in page.text
    wrong = c.post("/login", data={"key": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "wrong key" in wrong.text and SESSION_COOKIE not in c.cookies
    too_big = c.post("/login", content=b"key=" + b"a" * 10_000, follow_redirects=False)
    assert too_big.status_code == 401 and "too large" in too_big.text
    ok = c.post("/login", data={"key": "s3cret"}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "./"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret" not in cookie  # not the key itself
    assert c.get("/").text == PAGE_HTML and c.get("/api/swarm").status_code == 200  # the cookie now
    other = client("changed")  # a new key signs every browser out
    assert other.get("/", cookies={SESSION_COOKIE: c.cookies[SESSION_COOKIE]}).status_code == 401


def test_key_guard() -> None:
    guard = KeyGuard("k")
    assert guard.allows({"authorization": "bearer k"}) and not guard.allows({"authorization": "Bearer k2"})
    assert guard.allows({"cookie": f"a=1; {SESSION_COOKIE}={guard.session_token()}"})
    assert guard.sign_in(b"key=k") and not guard.sign_in(b"key=\xff") and not guard.sign_in(b"")
    assert KeyGuard(None).allows({}) and not KeyGuard(None).required
