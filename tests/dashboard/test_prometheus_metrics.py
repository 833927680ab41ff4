"""Prometheus plumbing: ``meshinfer.metrics`` (registries, HTTP exposition) and ``server.metrics`` (a block
server's metrics fed from plain numbers), parsed back with prometheus_client's own parser."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.errors import ConfigError
from meshinfer.loopthread import LoopThread, call_on_loop
from meshinfer.metrics import MetricsHTTPServer, SessionMetrics, render, scrape_url
from meshinfer.server.config import ServerConfig
from meshinfer.server.metrics import ServerMetrics, ServerSample


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], family: str, name: str | None = None, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name or family}{labels}")


SAMPLE = ServerSample(sessions_open=2, queued_steps=3, kv_tokens_used=512, kv_tokens_capacity=4096,
                      throughput=123.5, state="draining", peer_id="QmPeer", model_id="abc", model_name="tiny",
                      span="0:4", version="0.1.0")


def test_server_metrics_have_conventional_names_types_and_values() -> None:
    m = ServerMetrics()
    m.sample(SAMPLE)
    for tokens, seconds, ok in ((7, 0.004, True), (1, 0.0009, True), (1, 0.2, False)):
        m.on_step(tokens, seconds, ok)
    fams = families(render(m.registry)[0].decode())
    types = {name: fams[name].type for name in (
        "meshinfer_sessions_open", "meshinfer_queued_steps", "meshinfer_kv_tokens_used", "meshinfer_kv_tokens_capacity",
        "meshinfer_throughput_tokens_per_second", "meshinfer_tokens_served", "meshinfer_steps",
        "meshinfer_step_seconds", "meshinfer_decode_step_seconds", "meshinfer_server_state",
        "meshinfer_server_info")}
    assert types == {"meshinfer_sessions_open": "gauge", "meshinfer_queued_steps": "gauge",
                     "meshinfer_kv_tokens_used": "gauge", "meshinfer_kv_tokens_capacity": "gauge",
                     "meshinfer_throughput_tokens_per_second": "gauge", "meshinfer_tokens_served": "counter",
                     "meshinfer_steps": "counter", "meshinfer_step_seconds": "histogram",
                     "meshinfer_decode_step_seconds": "histogram", "meshinfer_server_state": "gauge",
                     "meshinfer_server_info": "gauge"}
    assert value(fams, "meshinfer_sessions_open") == 2 and value(fams, "meshinfer_queued_steps") == 3
    assert value(fams, "meshinfer_kv_tokens_used") == 512 and value(fams, "meshinfer_kv_tokens_capacity") == 4096
    assert value(fams, "meshinfer_throughput_tokens_per_second") == 123.5
    assert value(fams, "meshinfer_tokens_served", "meshinfer_tokens_served_total") == 8  # failed steps serve none
    assert value(fams, "meshinfer_steps", "meshinfer_steps_total", outcome="ok") == 2
    assert value(fams, "meshinfer_steps", "meshinfer_steps_total", outcome="error") == 1
    assert value(fams, "meshinfer_step_seconds", "meshinfer_step_seconds_count") == 3
    assert value(fams, "meshinfer_step_seconds", "meshinfer_step_seconds_bucket", le="0.001") == 1
    assert value(fams, "meshinfer_step_seconds", "meshinfer_step_seconds_bucket", le="0.005") == 2
    assert value(fams, "meshinfer_step_seconds", "meshinfer_step_seconds_sum") == pytest.approx(0.2049)
    # one-token steps that succeeded only: not the 7-token prefill, not the failed step
    assert value(fams, "meshinfer_decode_step_seconds", "meshinfer_decode_step_seconds_count") == 1
    assert value(fams, "meshinfer_decode_step_seconds", "meshinfer_decode_step_seconds_sum") == pytest.approx(0.0009)
    states = {s.labels["meshinfer_server_state"]: s.value for s in fams["meshinfer_server_state"].samples}
    assert states == {"joining": 0, "online": 0, "draining": 1}
    (info,) = fams["meshinfer_server_info"].samples
    assert info.labels == {"peer_id": "QmPeer", "model_id": "abc", "model_name": "tiny", "span": "0:4",
                           "version": "0.1.0", "device": "cpu"}
    assert "meshinfer_device_memory_used_bytes" not in fams  # on the CPU: no device memory gauges


def test_gpu_sample_exports_device_memory_gauges() -> None:
    import dataclasses

    m = ServerMetrics()
    m.sample(dataclasses.replace(SAMPLE, device="NVIDIA H200", device_memory=(30 * 2**30, 110 * 2**30)))
    m.sample(dataclasses.replace(SAMPLE, device="NVIDIA H200", device_memory=(31 * 2**30, 109 * 2**30)))
    fams = families(render(m.registry)[0].decode())
    assert value(fams, "meshinfer_device_memory_used_bytes") == 31 * 2**30
    assert value(fams, "meshinfer_device_memory_free_bytes") == 109 * 2**30
    (info,) = fams["meshinfer_server_info"].samples
    assert info.labels["device"] == "NVIDIA H200"


def test_two_servers_in_one_process_keep_separate_registries() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.on_step(5, 0.01, True)
    fams_b = families(render(b.registry)[0].decode())
    assert value(fams_b, "meshinfer_tokens_served", "meshinfer_tokens_served_total") == 0


def test_session_metrics_for_the_gateway() -> None:
    m = SessionMetrics.create()
    m.sessions_open.inc()
    m.tokens_served.inc(12)
    m.failovers.inc()
    m.step_seconds.observe(0.02)
    fams = families(render(m.registry)[0].decode())
    assert {n: fams[n].type for n in ("meshinfer_sessions_open", "meshinfer_tokens_served", "meshinfer_failovers",
                                      "meshinfer_step_seconds")} == {
        "meshinfer_sessions_open": "gauge", "meshinfer_tokens_served": "counter", "meshinfer_failovers": "counter",
        "meshinfer_step_seconds": "histogram"}
    assert value(fams, "meshinfer_failovers", "meshinfer_failovers_total") == 1
    assert value(fams, "meshinfer_tokens_served", "meshinfer_tokens_served_total") == 12


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_metrics_http_server_refreshes_before_each_scrape() -> None:
    m = ServerMetrics()
    scrapes: list[float] = []

    def refresh() -> None:
        scrapes.append(time.monotonic())
        m.sample(SAMPLE)

    server = MetricsHTTPServer(m.registry, "127.0.0.1", 0, before_scrape=refresh).start()
    try:
        status, ctype, text = get(server.url)
        assert status == 200 and ctype.startswith("text/plain") and len(scrapes) == 1
        assert value(families(text), "meshinfer_sessions_open") == 2
        assert get(server.url.replace("/metrics", "/health"))[0] == 200
        assert get(server.url.replace("/metrics", "/other"))[0] == 404 and len(scrapes) == 1
    finally:
        server.stop()
        server.stop()  # idempotent


def test_a_failing_refresh_serves_the_last_values() -> None:
    m = ServerMetrics()
    m.sample(SAMPLE)

    def broken() -> None:
        raise RuntimeError("loop gone")

    server = MetricsHTTPServer(m.registry, before_scrape=broken).start()
    try:
        status, _, text = get(server.url)
        assert status == 200 and value(families(text), "meshinfer_queued_steps") == 3
    finally:
        server.stop()


def test_a_taken_port_is_a_config_error() -> None:
    first = MetricsHTTPServer(ServerMetrics().registry).start()
    try:
        with pytest.raises(ConfigError, match=r"cannot serve metrics on 127\.0\.0\.1"):
            MetricsHTTPServer(ServerMetrics().registry, "127.0.0.1", first.port)
    finally:
        first.stop()


def test_serve_samples_on_the_servers_loop() -> None:
    m = ServerMetrics()
    seen: list[str] = []

    def read() -> ServerSample:
        seen.append(threading.current_thread().name)
        return SAMPLE

    with LoopThread("server-loop") as runner:
        url = m.serve("127.0.0.1", 0, runner.loop, read)
        try:
            assert m.url == url and url.startswith("http://127.0.0.1:")
            assert value(families(get(url)[2]), "meshinfer_kv_tokens_used") == 512
        finally:
            m.stop()
    assert seen == ["server-loop"] and m.url is None


def test_call_on_loop_times_out_when_the_loop_is_busy() -> None:
    with LoopThread("busy-loop") as runner:
        blocker = threading.Event()
        runner.loop.call_soon_threadsafe(blocker.wait, 2.0)  # blocks the loop for up to 2 s
        with pytest.raises(TimeoutError):
            call_on_loop(runner.loop, lambda: 1, 0.2)
        blocker.set()
        assert call_on_loop(runner.loop, lambda: 41 + 1, 2.0) == 42


@pytest.mark.parametrize(("host", "port", "url"), [
    ("127.0.0.1", 9100, "http://127.0.0.1:9100/metrics"),
    ("0.0.0.0", 9100, "http://127.0.0.1:9100/metrics"),
    ("::", 1, "http://[::1]:1/metrics"),
    ("10.0.0.5", 80, "http://10.0.0.5:80/metrics"),
])
def test_scrape_url(host: str, port: int, url: str) -> None:
    assert scrape_url(host, port) == url


@pytest.mark.parametrize(("port", "ok"), [(None, True), (0, True), (9100, True), (65535, True), (-1, False),
                                          (65536, False)])
def test_server_config_metrics_port(port: int | None, ok: bool) -> None:
    if ok:
        assert ServerConfig(model="demo", metrics_port=port).metrics_port == port
    else:
        with pytest.raises(ConfigError, match=r"--metrics-port must be in 0\.\.65535"):
            ServerConfig(model="demo", metrics_port=port)
