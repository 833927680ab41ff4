"""Prometheus metrics shared by servers, the gateway and the dashboard: names, builders and exposition.

Contract: a leaf (imports ``prometheus_client``, the stdlib and ``meshinfer.errors`` only). Every metric
lives in a per-object ``CollectorRegistry`` (``new_registry``), never in prometheus_client's global one, so
several servers or apps in one process (tests) never clash. Names follow Prometheus conventions: the
``meshinfer_`` prefix, base units (seconds), ``_total`` on counters (added by prometheus_client), gauges for
levels. ``render(registry)`` gives the text exposition body and its content type (for an HTTP framework);
``MetricsHTTPServer`` serves ``GET /metrics`` from a daemon thread for processes without an HTTP app
(block servers), calling ``before_scrape`` first so the owner can refresh its gauges from its own event
loop. ``SessionMetrics`` is the client-side set (gateway: sessions open, tokens served, step latency,
failovers); block servers have theirs in ``meshinfer.server.metrics``. Knows nothing of sessions, servers
or the swarm: callers feed it plain numbers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from meshinfer.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "meshinfer"
STEP_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                                   30.0)
"""Histogram buckets (seconds) of step latencies: from a loopback decode step (~1 ms) to a long prefill."""


def new_registry() -> CollectorRegistry:
    """A fresh registry for one server or app (never the process-global one)."""
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def scrape_url(host: str, port: int) -> str:
    """``http://host:port/metrics`` as a client on this machine reaches it (wildcard hosts: loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


class MetricsHTTPServer:
    """``GET /metrics`` (and ``GET /health``) for one registry, served from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0, *,
                 before_scrape: Callable[[], None] | None = None) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics port must be in 0..65535, got {port}")
        self.registry = registry
        self.before_scrape = before_scrape
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server calls it by this name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    owner._refresh()
                    body, ctype = render(owner.registry)
                    self._reply(200, body, ctype)
                elif path == "/health":
                    self._reply(200, b"ok\n", "text/plain; charset=utf-8")
                else:
                    self._reply(404, b"not found: try /metrics\n", "text/plain; charset=utf-8")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # silence per-request logs
                return

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from None
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return scrape_url(self.host, self.port)

    def _refresh(self) -> None:
        if self.before_scrape is None:
            return
        try:
            self.before_scrape()
        except Exception:  # a failed refresh serves the last values
            log.debug("refreshing metrics before a scrape failed", exc_info=True)

    def start(self) -> MetricsHTTPServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name=f"meshinfer-metrics:{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5.0)
            self._thread = None
        self._httpd.server_close()


@dataclass
class SessionMetrics:
    """Client-side metrics of a process that runs inference sessions (the gateway): feed it from sessions."""

    registry: CollectorRegistry
    sessions_open: Gauge
    tokens_served: Counter
    step_seconds: Histogram
    failovers: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> SessionMetrics:
        registry = registry if registry is not None else new_registry()
        return cls(
            registry=registry,
            sessions_open=Gauge(f"{PREFIX}_sessions_open", "Inference sessions open now", registry=registry),
            tokens_served=Counter(f"{PREFIX}_tokens_served", "Tokens generated for clients", registry=registry),
            step_seconds=Histogram(f"{PREFIX}_step_seconds", "Seconds one generation step took through the swarm",
                                   buckets=STEP_BUCKETS, registry=registry),
            failovers=Counter(f"{PREFIX}_failovers", "Server failures sessions recovered from (replay elsewhere)",
                              registry=registry),
        )
