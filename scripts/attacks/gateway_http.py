"""Issue 17 findings 5, 8 and 9 (gateway) against a real ``meshinfer api`` process: run it with the tree to test
on PYTHONPATH (``/work/main/src`` for the code before, a worktree's ``src`` for after)::

    PYTHONPATH=$PWD/src python scripts/attacks/gateway_http.py [--key K]

It starts a tiny 2-server swarm and ``meshinfer api`` in front of it (all on 127.0.0.1), then: a 10 MB body
(time to its answer, ``GET /v1/models`` latency meanwhile, RSS of the api process before / peak during / after),
the inputs that were 500s, 40 slowloris sockets (how many the server closed, and when), the routes that answer
without the key, and an honest chat answer compared with a local run of the same checkpoint. Prints one JSON
document. Stops every process it started, by PID.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from http_attacks import Slowloris, post_head, post_json, read_response, timed_get
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm

FIVE_HUNDREDS = {
    "JSON nested 100,000 deep": b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "seed 2**70": b'{"model":"m","prompt":"hi","max_tokens":2,"seed":1180591620717411303424}',
    "echo with negative ids": b'{"model":"m","prompt":[-5,7],"echo":true,"max_tokens":0}',
    "id beyond the vocabulary": b'{"model":"m","prompt":[5,99999999],"max_tokens":2}',
    "lone surrogate in a prompt": b'{"model":"m","prompt":"a\\ud800b","max_tokens":2}',
    "lone surrogate in a message": b'{"model":"m","messages":[{"role":"user","content":"\\udc00"}],"max_tokens":2}',
}


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", default=None, help="run the api with this --api-key (for the auth figures)")
    parser.add_argument("--body-mb", type=float, default=10.0)
    parser.add_argument("--host", default="127.0.0.1", help="the api's --host (0.0.0.0: see the warning)")
    args = parser.parse_args()
    model_dir = tiny_checkpoint("llama", variant="llama3")
    swarm = LocalSwarm(model_dir, [(0, 2), (2, 4)], startup_timeout=120).start()
    extra = ["--api-key", args.key] if args.key else []
    api = ManagedProcess(meshinfer_argv("api", "--model", str(model_dir), "--initial-peers", *swarm.initial_peers,
                                        "--port", "0", "--host", args.host, "--served-model-name", "m", *extra,
                                        "--stop-on-stdin-eof"),
                         name="meshinfer api")
    out: dict = {}
    try:
        line = api.read_line(180)
        while not line.startswith("ready "):
            line = api.read_line(180)
        url = "http://127.0.0.1:" + json.loads(line[len("ready "):])["url"].rsplit(":", 1)[1]
        auth = {"Authorization": f"Bearer {args.key}"} if args.key else {}
        honest = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0,
                             "max_tokens": 6}).encode()
        out["honest_before"] = post_json(url, "/v1/chat/completions", honest, auth)[1]["choices"][0]["message"]
        out["models_ms_idle"] = round(timed_get(url, "/v1/models", auth)[1] * 1000, 1)
        time.sleep(1)
        out["rss_mb_before"] = base = rss_mb(api.pid)

        # finding 5: a 10 MB body (a prompt of that many characters), then one just under the body cap
        def big(body: bytes) -> dict:
            peak, done = [base], threading.Event()
            models_ms: list[float] = []

            def sample() -> None:
                while not done.is_set():
                    peak.append(rss_mb(api.pid))
                    time.sleep(0.05)

            def models() -> None:
                while not done.is_set():
                    t0 = time.perf_counter()
                    try:
                        timed_get(url, "/v1/models", auth)
                    except OSError:  # no answer within 30 s: counted as blocked that long
                        pass
                    models_ms.append(round((time.perf_counter() - t0) * 1000, 1))
                    time.sleep(0.1)

            threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=models, daemon=True)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            with post_head(url, "/v1/completions", {"Content-Length": str(len(body)), "Connection": "close",
                                                    **auth}, body) as sock:
                status, raw = read_response(sock, 300)
            took = round(time.perf_counter() - start, 2)
            time.sleep(0.3)
            done.set()
            for thread in threads:
                thread.join()
            return {"bytes": len(body), "status": status, "seconds": took,
                    "answer": raw[:160].decode("utf-8", "replace"), "models_ms_max_meanwhile": max(models_ms),
                    "models_calls_meanwhile": len(models_ms), "rss_mb_peak": max(peak)}

        out["big_body"] = big(b'{"model":"m","max_tokens":2,"prompt":"' + b"word " * int(args.body_mb * 1e6 / 5)
                              + b'"}')
        time.sleep(2)
        out["rss_mb_after_big"] = rss_mb(api.pid)
        out["body_under_cap"] = big(b'{"model":"m","max_tokens":2,"prompt":"' + b"word " * 800_000 + b'"}')
        time.sleep(2)
        out["rss_mb_after"] = rss_mb(api.pid)

        # finding 8: inputs that were 500s
        out["malformed"] = {}
        for name, raw_body in FIVE_HUNDREDS.items():
            path = "/v1/chat/completions" if b"messages" in raw_body else "/v1/completions"
            status, doc = post_json(url, path, raw_body, auth)
            out["malformed"][name] = [status, (doc.get("error") or {}).get("message", "")[:90]]

        # finding 9: slowloris sockets, and routes without the key
        socks = Slowloris(url, count=40).open()
        try:
            out["models_ms_during_slowloris"] = round(timed_get(url, "/v1/models", auth)[1] * 1000, 1)
            closed = Slowloris.closed_after(socks, limit=40)
        finally:
            for sock in socks:
                sock.close()
        shut = [c for c in closed if c is not None]
        out["slowloris"] = {"sockets": 40, "closed": len(shut), "first_s": round(min(shut), 2) if shut else None,
                            "last_s": round(max(shut), 2) if shut else None, "watched_s": 40}
        out["without_key"] = {p: timed_get(url, p)[0] for p in ("/", "/api/swarm", "/metrics", "/health",
                                                                 "/v1/models")}
        out["honest_after"] = post_json(url, "/v1/chat/completions", honest, auth)[1]["choices"][0]["message"]
        out["rss_mb_end"] = rss_mb(api.pid)
        out["stderr_warning"] = [ln for ln in api.stderr_tail(50).splitlines() if "WARNING" in ln]
    finally:
        api.stop(timeout=20)
        swarm.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
