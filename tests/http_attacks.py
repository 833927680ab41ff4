"""Raw-socket clients for the gateway's HTTP limit tests and ``scripts/attacks/gateway_http.py``: a request head
sent without its body, a chunked body that never ends, slowloris sockets (a partial request head, then
silence), and the time a plain request takes meanwhile. Only the sockets they open are closed by them."""

from __future__ import annotations

import json
import select
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """Status and raw bytes of the (first) response on ``sock`` (read until the headers and a little body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return (int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0), rest


def post_head(url: str, path: str, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    """A connection that sent a POST head (and ``body``, possibly partial); the caller reads and closes it."""
    sock = socket.create_connection(address(url), timeout=10)
    lines = [f"POST {path} HTTP/1.1", f"Host: {address(url)[0]}", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def timed_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, float]:
    """Status and seconds of one GET on a fresh connection."""
    start = time.perf_counter()
    with socket.create_connection(address(url), timeout=30) as sock:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
        status, _ = read_response(sock, 30)
    return status, time.perf_counter() - start


def post_json(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """Status and decoded JSON answer of one POST of raw ``body``."""
    with post_head(url, path, {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})},
                   body) as sock:
        status, raw = read_response(sock, 60)
    return status, json.loads(raw) if raw else {}


@dataclass
class Slowloris:
    """``count`` sockets each sending a partial request head (no blank line), then nothing."""

    url: str
    count: int = 40

    def open(self) -> list[socket.socket]:
        socks = []
        for i in range(self.count):
            sock = socket.create_connection(address(self.url), timeout=10)
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ".encode())
            socks.append(sock)
        return socks

    @staticmethod
    def closed_after(socks: list[socket.socket], limit: float) -> list[float | None]:
        """For each socket, seconds until the server closed it (None: still open after ``limit`` s)."""
        start = time.monotonic()
        when: list[float | None] = [None] * len(socks)
        while time.monotonic() - start < limit and any(w is None for w in when):
            open_ = [s for s, w in zip(socks, when, strict=True) if w is None]
            ready, _, _ = select.select(open_, [], [], 0.1)
            for sock in ready:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:  # EOF: the server closed it (after a 408, read in an earlier round)
                    when[socks.index(sock)] = time.monotonic() - start
        return when
