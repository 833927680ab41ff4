"""The dashboard and the servers' metrics against a live swarm: a bootstrap peer, three ``meshinfer serve``
processes of a tiny checkpoint (blocks 0:2, 2:4 and 1:3; short record lifetimes: ``--announce-ttl 6
--announce-refresh 2``; ``--metrics-port 0``) and ``meshinfer dashboard`` as a process, viewed in a real
headless Chromium. The tests run in file order on one module-scoped swarm: metrics first (a generation),
then the page, which ends by killing a server.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import save_artifact
from prometheus_client.parser import text_string_to_metric_families

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, wait_gone
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

SPANS = [(0, 2), (2, 4), (1, 3)]
SERVER_ARGS = ("--announce-ttl", "6", "--announce-refresh", "2", "--metrics-port", "0")
PROMPT = "The keeper climbed the tower"


@dataclass
class Live:
    model_dir: Path
    swarm: LocalSwarm
    dashboard: ManagedProcess
    url: str


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read()


def api(live: Live) -> dict[str, Any]:
    return json.loads(http_get(f"{live.url}/api/swarm"))


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def live(dash_bootstrap: list[str]) -> Iterator[Live]:
    model_dir = tiny_checkpoint("llama")
    swarm = LocalSwarm(model_dir, SPANS, initial_peers=dash_bootstrap, server_args=SERVER_ARGS, startup_timeout=120)
    swarm.start()
    procs = [s.proc for s in swarm.servers]
    dashboard = ManagedProcess(meshinfer_argv("dashboard", "--initial-peers", *dash_bootstrap, "--port", "0",
                                              "--interval", "1", "--stop-on-stdin-eof"), name="meshinfer dashboard")
    procs.append(dashboard)
    tree = [pid for p in procs for pid in p.descendants()]
    try:
        line = dashboard.read_line(60)
        assert line.startswith("ready "), line
        yield Live(model_dir, swarm, dashboard, json.loads(line[len("ready "):])["url"])
    finally:
        tree += [pid for p in procs for pid in p.descendants()]
        dashboard.stop(timeout=15)
        swarm.stop()
        assert not dashboard.alive() and not any(s.alive() for s in swarm.servers)
        assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"


def scrape(url: str) -> dict[str, Any]:
    """name -> family of the Prometheus text at ``url``, parsed by prometheus_client's own parser."""
    return {f.name: f for f in text_string_to_metric_families(http_get(url).decode())}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels} in {family}")


def test_each_server_exposes_prometheus_metrics_that_count_a_generation(live: Live) -> None:
    from meshinfer.client.model import DistributedModel

    urls = {s.peer_id: s.info["metrics_url"] for s in live.swarm.servers}
    assert all(isinstance(u, str) and u.startswith("http://127.0.0.1:") for u in urls.values()), urls
    before = {peer: scrape(url) for peer, url in urls.items()}
    for fams in before.values():
        assert sample(fams, "meshinfer_tokens_served", "meshinfer_tokens_served_total") == 0
    with DistributedModel.from_pretrained(live.model_dir, live.swarm.initial_peers) as model:
        prompt = [int(i) for i in model.tokenizer(PROMPT)["input_ids"]]
        tokens = model.generate(prompt, 6, stop_token_ids=())
        route = [hop.peer_id for hop in model.last_route]
    assert len(tokens) == 6 and route
    expected_types = {
        "meshinfer_sessions_open": "gauge", "meshinfer_queued_steps": "gauge", "meshinfer_kv_tokens_used": "gauge",
        "meshinfer_kv_tokens_capacity": "gauge", "meshinfer_throughput_tokens_per_second": "gauge",
        "meshinfer_tokens_served": "counter", "meshinfer_steps": "counter", "meshinfer_step_seconds": "histogram",
        "meshinfer_server_state": "gauge", "meshinfer_server_info": "gauge",  # an Enum and an Info, as text
    }
    for peer, url in urls.items():
        fams = scrape(url)
        assert {name: fams[name].type for name in expected_types} == expected_types
        served = sample(fams, "meshinfer_tokens_served", "meshinfer_tokens_served_total")
        steps = sample(fams, "meshinfer_step_seconds", "meshinfer_step_seconds_count")
        ok_steps = sample(fams, "meshinfer_steps", "meshinfer_steps_total", outcome="ok")
        if peer in route:  # the prompt (one prefill step) and then one decode step per further token
            assert served >= len(prompt) + 5, (peer, served)
            assert steps == ok_steps >= 6
            assert sample(fams, "meshinfer_step_seconds", "meshinfer_step_seconds_bucket", le="+Inf") == steps
            assert sample(fams, "meshinfer_step_seconds", "meshinfer_step_seconds_sum") > 0
        else:
            assert served == steps == 0
        assert sample(fams, "meshinfer_kv_tokens_capacity", "meshinfer_kv_tokens_capacity") == 16384
        assert sample(fams, "meshinfer_server_state", "meshinfer_server_state", meshinfer_server_state="online") == 1
        info = next(s.labels for s in fams["meshinfer_server_info"].samples)
        assert info["peer_id"] == peer and info["span"] in {f"{a}:{b}" for a, b in SPANS}
    # the sessions closed with the model: nothing open, no KV memory held (the close reaches servers async)
    for url in urls.values():
        wait_for(lambda u=url: sample(scrape(u), "meshinfer_sessions_open", "meshinfer_sessions_open") == 0
                 and sample(scrape(u), "meshinfer_kv_tokens_used", "meshinfer_kv_tokens_used") == 0,
                 10, "sessions to close")


def test_api_swarm_is_the_swarm_document_with_round_trips(live: Live) -> None:
    servers = {s.peer_id: s for s in live.swarm.servers}
    doc = wait_for(lambda: (d := api(live)) and all(s["rtt_ms"] is not None for m in d["models"]
                                                    for s in m["servers"]) and d["models"] and d, 30,
                   "round trips to every server")
    assert doc["error"] is None and doc["complete"] is True
    (model,) = doc["models"]
    assert model["model_id"] == live.swarm.model_id and model["num_blocks"] == 4
    assert model["block_servers"] == [1, 2, 2, 1] and model["missing_blocks"] == []
    assert {s["peer_id"]: s["span"] for s in model["servers"]} == {p: str(s.span) for p, s in servers.items()}
    assert all(0 < s["rtt_ms"] < 5000 for s in model["servers"])
    assert doc["totals"]["servers"] == 3 and doc["totals"]["missing_blocks"] == 0
    assert doc["served_at"] >= doc["updated_at"] > 0
    health = json.loads(http_get(f"{live.url}/health"))
    assert health["ok"] is True and health["servers"] == 3


def cells(page: Any) -> list[int]:
    return [int(c) for c in page.eval_on_selector_all(".coverage .cell", "els => els.map(e => e.dataset.servers)")]


def test_page_shows_the_swarm_and_drops_a_killed_server(live: Live, chromium: Any, tmp_path: Path) -> None:
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(live.url)
        page.wait_for_function("document.querySelectorAll('#servers tbody tr').length === 3", timeout=30_000)
        assert page.get_attribute("body", "data-state") == "ok"
        assert page.locator(".model").count() == 1
        assert page.locator(".coverage .cell").count() == 4  # one cell per block
        assert cells(page) == [1, 2, 2, 1]
        rows = page.eval_on_selector_all("#servers tbody tr", "els => els.map(e => e.dataset.peerId)")
        assert sorted(rows) == sorted(s.peer_id for s in live.swarm.servers)
        page.wait_for_function("[...document.querySelectorAll('#servers tbody tr td:last-child')]"
                               ".every(td => td.textContent.endsWith(' ms'))", timeout=30_000)
        assert page.locator("#empty").is_hidden() and page.locator("#error").is_hidden()
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        save_artifact(shot, "dashboard.png")

        victim = next(s for s in live.swarm.servers if str(s.span) == "1:3")
        live.swarm.stop_server(victim, graceful=False)  # SIGKILL: no goodbye, its records must expire
        started = time.monotonic()
        page.wait_for_function("document.querySelectorAll('#servers tbody tr').length === 2", timeout=45_000)
        gone_after = time.monotonic() - started
        rows = page.eval_on_selector_all("#servers tbody tr", "els => els.map(e => e.dataset.peerId)")
        assert victim.peer_id not in rows and len(rows) == 2
        assert cells(page) == [1, 1, 1, 1]
        assert gone_after < 30, gone_after  # ttl 6 s + a refresh or two, not minutes
        shot = tmp_path / "dashboard-after-kill.png"
        page.screenshot(path=str(shot), full_page=True)
        save_artifact(shot, "dashboard-after-kill.png")
    finally:
        page.close()
