"""Who may see the dashboard: the API key as a bearer header (scripts, Prometheus) or as a session cookie
(a browser, after signing in once on the login page).

Contract: ``KeyGuard(api_key)`` answers ``allows(headers)`` for a request's headers: always True without a
key; else True for ``Authorization: Bearer <key>`` or for the cookie ``SESSION_COOKIE`` holding
``session_token()`` (an HMAC of the key, so the cookie is not the key and changing the key signs every
browser out). ``sign_in(form_body)`` checks a login form's ``key`` field (constant-time comparisons
throughout). ``LOGIN_HTML`` is the sign-in page (a password field POSTed to ``login``, relative, so it works
under a prefix). Pure: no HTTP framework, no network.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from collections.abc import Mapping
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

SESSION_COOKIE = "meshinfer_session"
MAX_LOGIN_BYTES = 4096
"""The largest login form accepted (it holds one key)."""


class KeyGuard:
    """The dashboard's access check (see the module docstring)."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    @property
    def required(self) -> bool:
        return self.api_key is not None

    def session_token(self) -> str:
        """The cookie value a signed-in browser holds."""
        assert self.api_key is not None
        return hmac.new(self.api_key.encode(), b"meshinfer dashboard session", hashlib.sha256).hexdigest()

    def allows(self, headers: Mapping[str, str]) -> bool:
        """Whether a request with these headers may see the dashboard."""
        if self.api_key is None:
            return True
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no session
            return False
        morsel = cookie.get(SESSION_COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self.session_token().encode())

    def sign_in(self, form_body: bytes) -> bool:
        """Whether the login form (``key=...``, URL-encoded) gives the key."""
        if self.api_key is None:
            return True
        try:
            fields = parse_qs(form_body.decode("utf-8"), max_num_fields=4)
        except (UnicodeDecodeError, ValueError):
            return False
        given = (fields.get("key") or [""])[0]
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), self.api_key.encode())

    def cookie_header(self) -> str:
        """The ``Set-Cookie`` value that signs a browser in (HTTP only, same site only)."""
        return f"{SESSION_COOKIE}={self.session_token()}; Path=/; HttpOnly; SameSite=Strict"


def login_html(error: str | None = None) -> str:
    """The sign-in page (with ``error`` shown when the last attempt failed)."""
    note = f'<p class="err">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshinfer: sign in</title>
<style>body{{font:14px system-ui,sans-serif;background:#f7f8fa;display:flex;justify-content:center;padding-top:15vh}}
form{{background:#fff;border:1px solid #e4e7ec;border-radius:8px;padding:20px 24px;min-width:300px}}
input{{width:100%;padding:6px;margin:8px 0 12px}} .err{{color:#c62828}}</style></head>
<body data-state="login"><form method="post" action="login"><h1>meshinfer swarm</h1>
<p>This dashboard needs the API key.</p>{note}
<label>API key <input type="password" name="key" autofocus autocomplete="current-password"></label>
<button type="submit">Sign in</button></form></body></html>
"""
