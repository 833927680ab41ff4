"""A block server's Prometheus metrics: what it serves, how busy it is, how fast its steps are.

Contract: ``ServerMetrics`` owns one per-server ``CollectorRegistry`` (``meshinfer.metrics``) with
conventional names:

- ``meshinfer_sessions_open`` (gauge), ``meshinfer_queued_steps`` (gauge: steps waiting in the step loop),
  ``meshinfer_kv_tokens_used`` / ``meshinfer_kv_tokens_capacity`` (gauges: the KV budget in tokens),
  ``meshinfer_throughput_tokens_per_second`` (gauge: the announced single-session throughput),
  ``meshinfer_server_state`` (enum: joining/online/draining) and ``meshinfer_server_info`` (labels: peer id,
  model, span, version, device), all set by ``sample(ServerSample)`` from plain numbers; on a GPU also
  ``meshinfer_device_memory_used_bytes`` / ``meshinfer_device_memory_free_bytes`` (gauges: the whole device's
  memory as its driver reports it; absent on the CPU);
- ``meshinfer_tokens_served_total`` and ``meshinfer_steps_total{outcome="ok|error"}`` (counters) and
  ``meshinfer_step_seconds`` (histogram: a step's time from arrival at the server to its result, queueing
  included) and ``meshinfer_decode_step_seconds`` (the same, one-token steps that succeeded only: what a
  generated token costs in this server, which ``meshinfer bench swarm`` reads), fed by ``on_step`` (the
  step loop's hook, called on the event loop per finished step).

Counters are this object's, so they keep counting across span moves (a move replaces the step loop).
``serve(host, port, loop, read)`` exposes the registry over HTTP (``MetricsHTTPServer``): each scrape first
runs ``read()`` on the server's event loop (where its state lives) and samples the result; if the loop
does not answer within ``SAMPLE_TIMEOUT`` s the last values are served. Imports no torch and no network
beyond the stdlib HTTP server; knows nothing of sessions or the DHT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info

from meshinfer.loopthread import call_on_loop
from meshinfer.metrics import PREFIX, STEP_BUCKETS, MetricsHTTPServer, new_registry

T = TypeVar("T")

SAMPLE_TIMEOUT = 1.0
"""Seconds a scrape waits for the server's event loop to report its current state."""
STATES = ["joining", "online", "draining"]


@dataclass(frozen=True)
class ServerSample:
    """The server's levels at one moment (plain numbers, read on its event loop)."""

    sessions_open: int
    queued_steps: int
    kv_tokens_used: int
    kv_tokens_capacity: int
    throughput: float
    state: str
    peer_id: str = ""
    model_id: str = ""
    model_name: str = ""
    span: str = ""
    version: str = ""
    device: str = "cpu"
    device_memory: tuple[int, int] | None = None
    """(used, free) bytes of the GPU's memory; None on the CPU (no gauge exported)."""


class ServerMetrics:
    """Every metric of one block server, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.sessions_open = Gauge(f"{PREFIX}_sessions_open", "Inference sessions open on this server", registry=r)
        self.queued_steps = Gauge(f"{PREFIX}_queued_steps", "Steps waiting in the server's step loop", registry=r)
        self.kv_tokens_used = Gauge(f"{PREFIX}_kv_tokens_used", "KV cache tokens reserved by open sessions",
                                    registry=r)
        self.kv_tokens_capacity = Gauge(f"{PREFIX}_kv_tokens_capacity", "KV cache budget of the server in tokens",
                                        registry=r)
        self.throughput = Gauge(f"{PREFIX}_throughput_tokens_per_second",
                                "Announced decode throughput of one session (tokens per second)", registry=r)
        self.state = Enum(f"{PREFIX}_server_state", "What the server announces", states=STATES, registry=r)
        self.info = Info(f"{PREFIX}_server", "Which model and blocks this server serves", registry=r)
        self.tokens_served = Counter(f"{PREFIX}_tokens_served", "Tokens computed through the served blocks",
                                     registry=r)
        self.steps = Counter(f"{PREFIX}_steps", "Steps finished by the step loop", ["outcome"], registry=r)
        self.step_seconds = Histogram(f"{PREFIX}_step_seconds",
                                      "Seconds from a step's arrival to its result (queueing included)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.decode_step_seconds = Histogram(f"{PREFIX}_decode_step_seconds",
                                             "Seconds from a one-token step's arrival to its result (successful "
                                             "steps only; queueing included)", buckets=STEP_BUCKETS, registry=r)
        self.device_memory_used: Gauge | None = None  # created on the first GPU sample
        self.device_memory_free: Gauge | None = None
        for outcome in ("ok", "error"):
            self.steps.labels(outcome=outcome)  # export both series from the start (0 until counted)
        self._info: dict[str, str] = {}
        self._http: MetricsHTTPServer | None = None

    # ---- feeding -----------------------------------------------------------------------------

    def on_step(self, tokens: int, seconds: float, ok: bool) -> None:
        """One finished step: ``tokens`` computed in ``seconds`` since it arrived (``ok``: no error)."""
        self.steps.labels(outcome="ok" if ok else "error").inc()
        if ok:
            self.tokens_served.inc(max(0, tokens))
        self.step_seconds.observe(max(0.0, seconds))
        if ok and tokens == 1:
            self.decode_step_seconds.observe(max(0.0, seconds))

    def sample(self, s: ServerSample) -> None:
        """Set every gauge from ``s``."""
        self.sessions_open.set(s.sessions_open)
        self.queued_steps.set(s.queued_steps)
        self.kv_tokens_used.set(s.kv_tokens_used)
        self.kv_tokens_capacity.set(s.kv_tokens_capacity)
        self.throughput.set(s.throughput)
        if s.state in STATES:
            self.state.state(s.state)
        if s.device_memory is not None:
            r = self.registry
            if self.device_memory_used is None or self.device_memory_free is None:
                self.device_memory_used = Gauge(f"{PREFIX}_device_memory_used_bytes",
                                                "Bytes of the GPU's memory in use (all processes)", registry=r)
                self.device_memory_free = Gauge(f"{PREFIX}_device_memory_free_bytes",
                                                "Bytes of the GPU's memory free", registry=r)
            self.device_memory_used.set(s.device_memory[0])
            self.device_memory_free.set(s.device_memory[1])
        info = {"peer_id": s.peer_id, "model_id": s.model_id, "model_name": s.model_name, "span": s.span,
                "version": s.version, "device": s.device}
        if info != self._info:
            self.info.info(info)
            self._info = info

    # ---- HTTP --------------------------------------------------------------------------------

    def serve(self, host: str, port: int, loop: asyncio.AbstractEventLoop,
              read: Callable[[], ServerSample]) -> str:
        """Serve ``/metrics`` on ``host:port`` (0: a free port), sampling ``read()`` on ``loop`` per scrape;
        returns the scrape URL."""
        def before_scrape() -> None:
            self.sample(call_on_loop(loop, read, SAMPLE_TIMEOUT))

        self._http = MetricsHTTPServer(self.registry, host, port, before_scrape=before_scrape).start()
        return self._http.url

    @property
    def url(self) -> str | None:
        """The scrape URL while serving, else None."""
        return self._http.url if self._http is not None else None

    def stop(self) -> None:
        """Stop the HTTP endpoint (idempotent)."""
        if self._http is not None:
            self._http.stop()
            self._http = None

