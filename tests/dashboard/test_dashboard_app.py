"""The dashboard's HTTP routes over a fixed payload (FastAPI's test client; no network, no browser)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.dashboard.app import StaticSource, create_app, dashboard_router, served_json
from meshinfer.dashboard.doc import dashboard_payload
from meshinfer.dashboard.page import PAGE_HTML


def swarm_payload(error: str | None = None, updated_at: float | None = 100.0) -> dict[str, Any]:
    servers = [{"peer_id": "a", "span": "0:2", "state": "online", "throughput": 5.0, "sessions": 1},
               {"peer_id": "b", "span": "1:3", "state": "draining", "throughput": 3.0, "sessions": 0}]
    doc = {"models": [{"model_id": "m1", "name": "tiny", "num_blocks": 4, "missing_blocks": [3],
                       "block_servers": [1, 2, 1, 0], "block_throughput": [5.0, 5.0, 0.0, 0.0],
                       "servers": servers}], "complete": True}
    return dashboard_payload(doc, error=error, updated_at=updated_at, rtt_ms={"a": 0.5})


def client_for(payload: dict[str, Any]) -> TestClient:
    return TestClient(create_app(StaticSource(payload)))


def test_the_page_is_one_self_contained_document() -> None:
    r = client_for(swarm_payload()).get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == PAGE_HTML
    assert not re.search(r"""\b(src|href)\s*=|@import|url\(|https?://""", PAGE_HTML)  # nothing fetched elsewhere
    assert 'fetch("api/swarm"' in PAGE_HTML  # relative: works under a prefix too
    for needle in ("no models are being served", "cannot reach the swarm: ", 'id="servers"'):
        assert needle in PAGE_HTML


def test_api_swarm_serves_the_payload_with_served_at() -> None:
    payload = swarm_payload()
    r = client_for(payload).get("/api/swarm")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    served_at = body.pop("served_at")
    assert body == payload and served_at > 1e9


@pytest.mark.parametrize(("body", "expected"), [(b"{}", {}), (b'{"a": 1}', {"a": 1})])
def test_served_json_splices_into_any_object(body: bytes, expected: dict[str, Any]) -> None:
    class Raw:
        def snapshot(self) -> dict[str, Any]:
            return {}

        def snapshot_json(self) -> bytes:
            return body

    doc = json.loads(served_json(Raw()))
    assert doc.pop("served_at") > 0 and doc == expected


@pytest.mark.parametrize(("payload", "status", "error"), [
    (swarm_payload(), 200, None),
    (swarm_payload(error="no initial peer answered"), 503, "no initial peer answered"),
    (swarm_payload(updated_at=None), 503, "the swarm has not been read yet"),
])
def test_health(payload: dict[str, Any], status: int, error: str | None) -> None:
    r = client_for(payload).get("/health")
    assert r.status_code == status and r.json()["error"] == error and r.json()["ok"] is (status == 200)


def test_metrics_describe_the_swarm() -> None:
    r = client_for(swarm_payload()).get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    labels = {"model_id": "m1", "model_name": "tiny"}
    expected = {"meshinfer_swarm_models": ({}, 1), "meshinfer_swarm_up": ({}, 1),
                "meshinfer_swarm_servers": (labels, 2), "meshinfer_swarm_servers_online": (labels, 1),
                "meshinfer_swarm_missing_blocks": (labels, 1),
                "meshinfer_swarm_throughput_tokens_per_second": (labels, 0.0)}
    for name, (want_labels, value) in expected.items():
        (s,) = fams[name].samples
        assert fams[name].type == "gauge" and s.labels == want_labels and s.value == value, name
    assert "meshinfer_dashboard_reads" not in fams  # a static source has no reads to count


def test_metrics_count_a_pollers_reads() -> None:
    source = StaticSource(swarm_payload(error="boom"))
    source.reads, source.failures = 4, 2  # type: ignore[attr-defined]
    fams = {f.name: f for f in text_string_to_metric_families(TestClient(create_app(source)).get("/metrics").text)}
    assert fams["meshinfer_dashboard_reads"].type == "counter"
    assert {s.labels["outcome"]: s.value for s in fams["meshinfer_dashboard_reads"].samples} == {"ok": 4, "error": 2}
    assert fams["meshinfer_swarm_up"].samples[0].value == 0


def test_a_host_app_can_include_the_page_without_health_and_metrics() -> None:
    host = FastAPI()

    @host.get("/health")
    async def own_health() -> dict[str, str]:
        return {"owner": "host"}

    host.include_router(dashboard_router(StaticSource(swarm_payload()), include_health=False, include_metrics=False))
    client = TestClient(host)
    assert client.get("/").text == PAGE_HTML
    assert client.get("/api/swarm").json()["totals"]["servers"] == 2
    assert client.get("/health").json() == {"owner": "host"}
    assert client.get("/metrics").status_code == 404
