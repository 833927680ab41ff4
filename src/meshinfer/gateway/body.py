"""Reading a request body under the gateway's limits: a size cap and a deadline, checked before anything is
parsed or tokenised.

Contract: ``read_body(request, limits)`` returns the whole body, or raises ``ApiError``: 413
``request_too_large`` when ``Content-Length`` announces more than ``limits.max_body_bytes`` (nothing is read)
or when a body without one (chunked) grows past it as it streams in (reading stops there: at most the cap plus
one chunk is ever held), 400 for a malformed ``Content-Length``, 408 ``request_timeout`` when the whole body
has not arrived within ``limits.body_timeout`` seconds. What is left unread of a refused body is drained and
discarded by the protocol (``gateway.httpguard``) under its own deadline. Knows nothing of JSON or models.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from meshinfer.gateway.config import HttpLimits
from meshinfer.gateway.requests import ApiError, bad


def _too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, f"the request body {what} (limit --max-body-bytes {limit})", code="request_too_large")


async def read_body(request: Request, limits: HttpLimits) -> bytes:
    """The request's body under ``limits`` (see the module docstring)."""
    cap = limits.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise bad(f"Content-Length must be a number of bytes, got {length[:40]!r}")
        if int(length) > cap:
            raise _too_large(f"announces {int(length)} bytes", cap)
    chunks: list[bytes] = []
    total = 0

    async def collect() -> None:
        nonlocal total
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise _too_large(f"is over {cap} bytes", cap)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), limits.body_timeout)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout:g} s "
                            f"(limit --body-timeout {limits.body_timeout:g}); {total} bytes came",
                       code="request_timeout") from None
    return b"".join(chunks)
