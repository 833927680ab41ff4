"""``meshinfer api`` as a real subprocess in front of the test swarm, and its flag errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import openai
import pytest
from gateway_helpers import Served, local_chat

from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, wait_gone

pytestmark = pytest.mark.slow

READY = "ready "


def test_meshinfer_api_serves_until_sigterm(served: Served, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k-123\n")
    argv = meshinfer_argv("api", "--model", str(served.model_dir), "--initial-peers", *served.swarm.initial_peers,
                          "--port", "0", "--api-key-file", str(key_file), "--served-model-name", "cli-tiny",
                          "--stop-on-stdin-eof")
    proc = ManagedProcess(argv, name="meshinfer api")
    try:
        line = proc.read_line(120)
        while not line.startswith(READY):
            line = proc.read_line(120)
        info = json.loads(line[len(READY):])
        assert info["model"] == "cli-tiny" and info["api_key_required"] is True
        assert info["model_id"] == served.swarm.model_id and info["base_url"] == info["url"] + "/v1"
        with openai.OpenAI(base_url=info["base_url"], api_key="k-123", max_retries=0, timeout=60) as client:
            assert [m.id for m in client.models.list().data] == ["cli-tiny"]
            messages = [{"role": "user", "content": "Hello"}]
            got = client.chat.completions.create(model="cli-tiny", messages=messages, temperature=0, max_tokens=6)
            assert got.choices[0].message.content == local_chat(served.local, messages, 6)[0]
        with openai.OpenAI(base_url=info["base_url"], api_key="nope", max_retries=0) as client, \
                pytest.raises(openai.AuthenticationError):
            client.models.list()
        # the dashboard is served at / of the API, its data at /api/swarm, the gateway's metrics at /metrics
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        # with a key, all of them need it: a bearer header, or a browser's session cookie after signing in
        url = info["url"]
        for path in ("/", "/api/swarm", "/metrics"):
            assert httpx.get(url + path, timeout=30).status_code == 401, path
            assert httpx.get(url + path, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
        assert 'name="key"' in httpx.get(url + "/", timeout=30).text  # the sign-in page
        assert httpx.get(url + "/health", timeout=30).status_code in (200, 503)  # open: a load balancer's probe
        with httpx.Client(base_url=url, timeout=30) as browser:
            assert browser.post("/login", data={"key": "wrong"}).status_code == 401
            signed = browser.post("/login", data={"key": "k-123"}, follow_redirects=True)
            assert signed.status_code == 200 and "<html" in signed.text.lower() and 'name="key"' not in signed.text
            doc = browser.get("/api/swarm").json()  # the page's own polling, with the cookie
        assert served.swarm.model_id in json.dumps(doc)
        # issue 19: inside meshinfer api the page also gets this gateway's own live audit counters
        assert doc["gateway_audits"] is not None and doc["gateway_audits"]["detections"] == 0, doc["gateway_audits"]
        assert all("gateway_audits" in s for m in doc["models"] for s in m["servers"])
        auth = {"Authorization": "Bearer k-123"}
        assert httpx.get(url + "/api/swarm", headers=auth, timeout=30).status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics", headers=auth,
                                                                                timeout=30).text)}
        served_tokens = families["meshinfer_tokens_served"].samples
        assert families["meshinfer_tokens_served"].type == "counter" and served_tokens[0].value >= 1
        assert families["meshinfer_step_seconds"].type == "histogram"
        tree = proc.descendants()
    finally:
        code = proc.stop(timeout=20)
    assert code == 0, proc.stderr_tail()
    assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"


@pytest.mark.parametrize(("flags", "needle"), [
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--api-key", "a", "--api-key-file", "/nonexistent"], "not both"),
    (["--api-key-file", "/nonexistent/key"], "cannot read --api-key-file"),
    (["--max-download", "-1"], "--max-download must be > 0 MB/s"),
    (["--model", "x=/nonexistent", "--served-model-name", "x"], "each served name may be given once"),
    (["--model", "auto", "--auto-max-models", "0"], "--auto-max-models must be >= 1"),
    (["--model", "auto", "--auto-refresh-s", "0"], "--auto-refresh-s must be > 0"),
])
def test_bad_flags_are_one_line_errors(flags: list[str], needle: str) -> None:
    argv = meshinfer_argv("api", "--model", "/nonexistent", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm", *flags)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_parse_model_flags() -> None:
    from meshinfer.cli.api import parse_model_flags

    assert parse_model_flags(["org/m"], None) == [(None, "org/m")]
    assert parse_model_flags(["org/m", "b=./dir", "org/x"], "first") == [("first", "org/m"), ("b", "./dir"),
                                                                          (None, "org/x")]
    assert parse_model_flags(["a=org/m"], "ignored") == [("a", "org/m")]
    assert parse_model_flags(["./dir/a=b"], None) == [(None, "./dir/a=b")]  # a path with '=' is no name
