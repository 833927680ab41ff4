"""Issue 17 findings 5, 8 and 9 against a real ``meshinfer api`` process in front of the test swarm: a 10 MB body
is refused at once (413, by its Content-Length) and a body under the cap but too long for the context is refused
before tokenising, while ``GET /v1/models`` stays fast and the process's RSS stays within 10%; the inputs that
were 500s are 400s; 40 slowloris sockets are all closed within ``--header-timeout``; honest chat answers stay
exact (compared with a local run of the same checkpoint)."""

from __future__ import annotations

import json
import threading
import time

import psutil
import pytest
from gateway_helpers import Served, local_chat

from http_attacks import Slowloris, post_head, post_json, read_response, timed_get
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, wait_gone

pytestmark = pytest.mark.slow

MALFORMED = [  # each was a 500 before (issue 17 finding 8)
    b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model":"m","prompt":"hi","max_tokens":2,"seed":1180591620717411303424}',
    b'{"model":"m","prompt":[-5,7],"echo":true,"max_tokens":0}',
    b'{"model":"m","prompt":"a\\ud800b","max_tokens":2}',
    b'{"model":"m","messages":[{"role":"user","content":"\\udc00"}],"max_tokens":2}',
]


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_body_limits_malformed_inputs_and_slowloris_against_meshinfer_api(served: Served) -> None:
    argv = meshinfer_argv("api", "--model", str(served.model_dir), "--initial-peers", *served.swarm.initial_peers,
                          "--port", "0", "--served-model-name", "m", "--max-body-bytes", str(1 << 20),
                          "--header-timeout", "2", "--stop-on-stdin-eof")
    proc = ManagedProcess(argv, name="meshinfer api")
    messages = [{"role": "user", "content": "Hello"}]
    honest = json.dumps({"model": "m", "messages": messages, "temperature": 0, "max_tokens": 6}).encode()
    want = local_chat(served.local, messages, 6)[0]
    try:
        line = proc.read_line(120)
        while not line.startswith("ready "):
            line = proc.read_line(120)
        url = json.loads(line[len("ready "):])["url"]
        assert post_json(url, "/v1/chat/completions", honest)[1]["choices"][0]["message"]["content"] == want
        time.sleep(0.5)
        base = rss(proc.pid)

        slowest: list[float] = []
        done = threading.Event()

        def poll_models() -> None:
            while not done.is_set():
                status, took = timed_get(url, "/v1/models")
                assert status == 200
                slowest.append(took)
                time.sleep(0.05)

        poller = threading.Thread(target=poll_models, daemon=True)
        poller.start()
        try:
            for body, want_status in ((b'{"model":"m","prompt":"' + b"word " * 2_000_000 + b'"}', 413),
                                      (b'{"model":"m","prompt":"' + b"word " * 200_000 + b'"}', 400)):
                start = time.perf_counter()
                with post_head(url, "/v1/completions", {"Content-Length": str(len(body)), "Connection": "close"},
                               body) as sock:
                    status, raw = read_response(sock, 60)
                assert status == want_status and time.perf_counter() - start < 3, raw[:200]
                code = json.loads(raw)["error"]["code"]
                assert code == ("request_too_large" if status == 413 else "context_length_exceeded")
        finally:
            done.set()
            poller.join(30)
        assert slowest and max(slowest) < 1.0, slowest
        assert rss(proc.pid) < base * 1.1

        for raw in MALFORMED:
            path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
            status, doc = post_json(url, path, raw)
            assert status == 400 and doc["error"]["type"] == "invalid_request_error", (raw[:60], doc)

        socks = Slowloris(url, count=40).open()
        try:
            assert timed_get(url, "/v1/models")[1] < 1.0
            closed = Slowloris.closed_after(socks, limit=10)
        finally:
            for sock in socks:
                sock.close()
        assert all(c is not None and 1.5 < c < 6 for c in closed), closed

        assert post_json(url, "/v1/chat/completions", honest)[1]["choices"][0]["message"]["content"] == want
        assert rss(proc.pid) < base * 1.1
        tree = proc.descendants()
    finally:
        code = proc.stop(timeout=20)
    assert code == 0, proc.stderr_tail()
    assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"
