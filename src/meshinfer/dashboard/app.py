"""The dashboard's HTTP side (FastAPI): the page, the JSON endpoint, health and the dashboard's own metrics.

Contract: ``create_app(source)`` builds a standalone app; ``dashboard_router(source, ...)`` gives the same
routes to include in another app (the gateway includes it to serve the page at ``/`` of ``meshinfer api``;
mounting a sub-app would lose nothing here either, as the routes need no lifespan). ``source`` is anything
with ``snapshot() -> dict`` and ``snapshot_json() -> bytes`` (a ``SwarmPoller``, or a fixed payload in tests):
handlers only read the latest payload, never wait for the DHT, so the page answers at once whatever the
swarm does. Routes:

- ``GET /``: the page (``page.PAGE_HTML``), or with a key and no session the sign-in page (401);
- ``POST /login``: a sign-in form (``key=...``, at most ``auth.MAX_LOGIN_BYTES``): the right key sets the
  session cookie and redirects to the page (303), a wrong one shows the sign-in page again (401);
- ``GET /api/swarm``: the payload (``doc.dashboard_payload``) with ``served_at`` (unix time) added;
- ``GET /health``: 200 ``{"ok": true, ...}`` when the last read succeeded, 503 with the error otherwise;
- ``GET /metrics``: Prometheus text: swarm gauges (``meshinfer_swarm_models``, ``meshinfer_swarm_servers``,
  ``meshinfer_swarm_missing_blocks``, ``meshinfer_swarm_throughput_tokens_per_second`` per model, ...) and,
  for a poller, its reads and failures, in a registry of this app's own.

With ``api_key`` set, ``/``, ``/api/swarm`` and ``/metrics`` need it (``auth.KeyGuard``: a bearer header or
the session cookie; 401 otherwise); ``/health`` stays open (a probe: it shows only counts and the last error).

Knows nothing of peers or records beyond the payload's JSON shape.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meshinfer.dashboard.auth import MAX_LOGIN_BYTES, KeyGuard, login_html
from meshinfer.dashboard.page import PAGE_HTML
from meshinfer.metrics import PREFIX, new_registry, render


class SwarmSource(Protocol):
    def snapshot(self) -> dict[str, Any]: ...

    def snapshot_json(self) -> bytes: ...


class StaticSource:
    """A fixed payload (tests, previews): ``snapshot`` is ``payload``, JSON-encoded once."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self._json = json.dumps(payload).encode()

    def snapshot(self) -> dict[str, Any]:
        return self.payload

    def snapshot_json(self) -> bytes:
        return self._json


class SwarmCollector(Collector):
    """Prometheus view of the latest payload (and the poller's counters when the source has them)."""

    def __init__(self, source: SwarmSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        p = self.source.snapshot()
        totals = p.get("totals") or {}
        models = GaugeMetricFamily(f"{PREFIX}_swarm_models", "Models announced in the swarm")
        models.add_metric([], totals.get("models", 0))
        yield models
        up = GaugeMetricFamily(f"{PREFIX}_swarm_up", "1 when the last read of the swarm succeeded")
        up.add_metric([], 0 if p.get("error") or p.get("updated_at") is None else 1)
        yield up
        labels = ["model_id", "model_name"]
        servers = GaugeMetricFamily(f"{PREFIX}_swarm_servers", "Servers of the model (any state)", labels=labels)
        online = GaugeMetricFamily(f"{PREFIX}_swarm_servers_online", "Online servers of the model", labels=labels)
        missing = GaugeMetricFamily(f"{PREFIX}_swarm_missing_blocks", "Blocks of the model no server holds",
                                    labels=labels)
        weakest = GaugeMetricFamily(f"{PREFIX}_swarm_throughput_tokens_per_second",
                                    "Online throughput of the model's weakest block (tokens per second)",
                                    labels=labels)
        for m in p.get("models", []):
            key = [m["model_id"], m["name"]]
            servers.add_metric(key, len(m["servers"]))
            online.add_metric(key, sum(1 for s in m["servers"] if s["state"] == "online"))
            missing.add_metric(key, len(m["missing_blocks"]))
            weakest.add_metric(key, float(m.get("bottleneck_throughput") or 0.0))
        yield from (servers, online, missing, weakest)
        reads, failures = getattr(self.source, "reads", None), getattr(self.source, "failures", None)
        if isinstance(reads, int) and isinstance(failures, int):
            done = CounterMetricFamily(f"{PREFIX}_dashboard_reads", "Reads of the swarm by the dashboard",
                                       labels=["outcome"])
            done.add_metric(["ok"], reads)
            done.add_metric(["error"], failures)
            yield done


def served_json(source: SwarmSource) -> bytes:
    """The latest payload's JSON with ``served_at`` spliced in first (no re-encoding of the document)."""
    body = source.snapshot_json()
    head = b'{"served_at": %.3f' % time.time()
    return head + (b", " + body[1:] if body[1:2] != b"}" else b"}")


LOGIN_TIMEOUT_S = 10.0
"""Seconds a sign-in form's body may take to arrive."""
UNAUTHORIZED = {"error": {"message": "this dashboard needs the API key: send 'Authorization: Bearer <key>' or sign "
                                     "in at /", "type": "authentication_error", "param": None,
                          "code": "invalid_api_key"}}


async def _small_body(request: Request, cap: int) -> bytes | None:
    """The body if it has at most ``cap`` bytes and arrives within ``LOGIN_TIMEOUT_S``; else None."""
    chunks: list[bytes] = []

    async def collect() -> bool:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                return False
            chunks.append(chunk)
        return True

    try:
        return b"".join(chunks) if await asyncio.wait_for(collect(), LOGIN_TIMEOUT_S) else None
    except TimeoutError:
        return None


def dashboard_router(source: SwarmSource, *, include_health: bool = True, include_metrics: bool = True,
                     registry: CollectorRegistry | None = None, api_key: str | None = None) -> APIRouter:
    """The dashboard's routes over ``source`` (health and metrics optional: a host app may have its own;
    ``api_key``: who may see it, see the module docstring)."""
    router = APIRouter()
    guard = KeyGuard(api_key)
    if include_metrics:
        registry = registry if registry is not None else new_registry()
        registry.register(SwarmCollector(source))

    def refused() -> Response:
        return JSONResponse(UNAUTHORIZED, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @router.get("/", include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        if not guard.allows(request.headers):
            return HTMLResponse(login_html(), status_code=401, headers={"Cache-Control": "no-store"})
        return HTMLResponse(PAGE_HTML, headers={"Cache-Control": "no-cache"})

    @router.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        body = await _small_body(request, MAX_LOGIN_BYTES)
        if body is None or not guard.sign_in(body):
            error = "the form is too large or too slow" if body is None else "wrong key"
            return HTMLResponse(login_html(error), status_code=401, headers={"Cache-Control": "no-store"})
        headers = {"Set-Cookie": guard.cookie_header()} if guard.required else None
        return RedirectResponse("./", status_code=303, headers=headers)

    @router.get("/api/swarm")
    async def api_swarm(request: Request) -> Response:
        if not guard.allows(request.headers):
            return refused()
        return Response(served_json(source), media_type="application/json", headers={"Cache-Control": "no-store"})

    if include_health:
        @router.get("/health")
        async def health() -> JSONResponse:
            p = source.snapshot()
            ok = not p.get("error") and p.get("updated_at") is not None
            body = {"ok": ok, "error": p.get("error"), "updated_at": p.get("updated_at"),
                    "models": (p.get("totals") or {}).get("models", 0),
                    "servers": (p.get("totals") or {}).get("servers", 0)}
            if not ok and body["error"] is None:
                body["error"] = "the swarm has not been read yet"
            return JSONResponse(body, status_code=200 if ok else 503)

    if include_metrics:
        assert registry is not None

        @router.get("/metrics", include_in_schema=False)
        async def metrics(request: Request) -> Response:
            if not guard.allows(request.headers):
                return refused()
            body, ctype = render(registry)
            return Response(body, media_type=ctype)

    return router


def create_app(source: SwarmSource, *, title: str = "meshinfer dashboard", api_key: str | None = None) -> FastAPI:
    """A standalone dashboard app over ``source`` (``meshinfer dashboard``), behind ``api_key`` when given."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(dashboard_router(source, api_key=api_key))
    return app
