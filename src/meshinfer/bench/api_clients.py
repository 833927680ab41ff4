"""The load generator of ``meshinfer bench api``, in its own process: C client threads send the given streaming
chat requests to a gateway and time each one.

Contract: ``python -m meshinfer.bench.api_clients URL CONCURRENCY`` reads a JSON list of request bodies on stdin,
sends them through CONCURRENCY threads (``bench.api.stream_chat``, stdlib HTTP only), and prints ONE JSON object
on stdout: ``{"wall_s": seconds from the first request sent to the last answer, "samples": [[ttft_s, total_s,
completion_tokens, error or null], ...]}`` in the order of the bodies. Run apart from the gateway so that the
clients' threads (SSE parsing per token) do not compete with the gateway's event loop for one interpreter, as
real clients never do. ``run_clients`` is the parent's side. Knows nothing of models or swarms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshinfer.bench.api import REQUEST_TIMEOUT_S, RequestSample, stream_chat
from meshinfer.errors import ConfigError

STARTUP_TIMEOUT_S = 120.0
"""Seconds the child may take beyond the requests' own timeout."""


def run_clients(url: str, concurrency: int, bodies: Sequence[dict[str, Any]]) -> tuple[float, list[RequestSample]]:
    """Send ``bodies`` to ``url`` from a child process with ``concurrency`` threads; (wall seconds, samples)."""
    timeout = REQUEST_TIMEOUT_S * (len(bodies) / max(concurrency, 1) + 1) + STARTUP_TIMEOUT_S
    done = subprocess.run([sys.executable, "-m", "meshinfer.bench.api_clients", url, str(concurrency)],
                          input=json.dumps(list(bodies)), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ConfigError(f"the bench's client process failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    out = json.loads(done.stdout)
    return float(out["wall_s"]), [RequestSample(float(a), float(b), int(c), e) for a, b, c, e in out["samples"]]


def main(argv: Sequence[str]) -> int:
    url, concurrency = argv[0], int(argv[1])
    bodies: list[dict[str, Any]] = json.loads(sys.stdin.read())
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"bench-api-{concurrency}") as pool:
        samples = list(pool.map(lambda body: stream_chat(url, body), bodies))
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall,
                      "samples": [[s.ttft_s, s.total_s, s.completion_tokens, s.error] for s in samples]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
