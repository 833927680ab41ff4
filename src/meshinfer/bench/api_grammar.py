"""What structured output costs per token: the same streaming chat requests through a running gateway, without
and with a ``response_format`` JSON schema, at one concurrency (default 16).

Contract: ``grammar_overhead(url, ...)`` takes a running gateway's root URL (``http://host:port``, as
``bench.api`` serves it) and sends ``requests`` streaming chat completions (``bench.api.stream_chat``, greedy,
``max_tokens``) through ``concurrency`` client threads, first plain, then each with ``GRAMMAR_FORMAT`` (an
object with one free string: a model fills it until ``max_tokens``, so both runs decode about as many tokens;
``ignore_eos`` does not exist yet). A request's decode time per token is (total - time to first token) /
(completion tokens - 1): the prefill and the grammar's compile (first request only; then cached) stay out of
it. Per run (pure ``summarise_tokens``): the median and p95 of those over requests in milliseconds, completion
tokens, failures; then ``overhead_ratio`` = constrained median / plain median (1.0: free). One untimed warm-up
request of each kind comes first. Never asserts a timing; no torch, no process started.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshinfer.bench.api import MODEL_NAME, RequestSample, stream_chat
from meshinfer.bench.common import percentile

__all__ = ["GRAMMAR_FORMAT", "grammar_overhead", "summarise_tokens"]

GRAMMAR_FORMAT: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "bench", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["answer"],
    "properties": {"answer": {"type": "string"}}}}}
"""The response_format of the constrained run."""


def summarise_tokens(samples: Sequence[RequestSample]) -> dict[str, Any]:
    """Decode milliseconds per token (median, p95 over requests) of one run's samples."""
    ok = [s for s in samples if s.error is None and s.completion_tokens > 1]
    out: dict[str, Any] = {"requests": len(samples), "failed": sum(s.error is not None for s in samples)}
    if not ok:
        out["errors"] = sorted({str(s.error) for s in samples if s.error is not None})[:3]
        return out
    per_token = [(s.total_s - s.ttft_s) * 1000 / (s.completion_tokens - 1) for s in ok]
    out.update({"ms_per_token": {"median": statistics.median(per_token), "p95": percentile(per_token, 0.95)},
                "completion_tokens": sum(s.completion_tokens for s in ok)})
    return out


def _bodies(n: int, max_tokens: int, model: str) -> list[dict[str, Any]]:
    from meshinfer.testing.tokenizer import corpus_text

    lines = [line.strip() for line in corpus_text().splitlines() if line.strip()] or ["Tell me a story."]
    return [{"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
             "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Answer in JSON. What comes after "
                                                     f"this? {lines[i % len(lines)][:200]}"}]} for i in range(n)]


def _run(url: str, bodies: Sequence[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-api-grammar") as pool:
        return summarise_tokens(list(pool.map(lambda body: stream_chat(url, body), bodies)))


def grammar_overhead(url: str, *, concurrency: int = 16, requests: int = 32, max_tokens: int = 32,
                     model: str = MODEL_NAME) -> dict[str, Any]:
    """Per-token decode time through the gateway at ``url`` without and with a JSON schema (see the module)."""
    plain = _bodies(requests, max_tokens, model)
    constrained = [{**body, "response_format": GRAMMAR_FORMAT} for body in plain]
    for body in (plain[0], constrained[0]):  # warm-up: routes, the grammar's compile
        stream_chat(url, body)
    out: dict[str, Any] = {"concurrency": concurrency, "requests": requests, "max_tokens": max_tokens,
                           "plain": _run(url, plain, concurrency), "json_schema": _run(url, constrained, concurrency)}
    try:
        out["overhead_ratio"] = out["json_schema"]["ms_per_token"]["median"] / out["plain"]["ms_per_token"]["median"]
    except (KeyError, ZeroDivisionError):
        out["overhead_ratio"] = None
    return out
