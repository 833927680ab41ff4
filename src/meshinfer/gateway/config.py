"""``GatewayConfig``: how the OpenAI-compatible gateway serves (address, key, limits); ``HttpLimits``: what one
HTTP connection may cost (header and body sizes, read timeouts), shared by ``meshinfer api`` and
``meshinfer dashboard``; ``exposure_warning``: the start-up warning for a keyless gateway on a public address.

Contract: validated, self-documenting dataclasses (field ``help`` becomes ``meshinfer api`` flag help);
values come only from explicit arguments, nothing is read from the environment or files here. Imports
only ``meshinfer.config`` and ``meshinfer.errors``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshinfer.config import doc
from meshinfer.errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP connection may cost the process that serves it."""

    max_body_bytes: int = doc(4 * MIB, "largest request body accepted, in bytes; a larger one gets 413 before "
                                       "it is read (by Content-Length, or as it streams in)")
    max_header_bytes: int = doc(16 * 1024, "most bytes of an unfinished request line plus headers held; more "
                                           "is a 400 and the connection closes")
    header_timeout: float = doc(15.0, "seconds a client has to send a request's line and headers (from its "
                                      "first byte, or from connecting); then the connection closes")
    body_timeout: float = doc(30.0, "seconds a client has to send a request's whole body; then 408")
    keepalive_timeout: int = doc(5, "seconds an idle keep-alive connection stays open between requests")

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_header_bytes < 1024:
            raise ConfigError(f"--max-header-bytes must be >= 1024, got {self.max_header_bytes}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 3600] seconds, got {value}")
        if not 1 <= self.keepalive_timeout <= 3600:
            raise ConfigError(f"--keepalive-timeout must be in 1..3600 seconds, got {self.keepalive_timeout}")


@dataclass(frozen=True)
class GatewayConfig(HttpLimits):
    """The gateway's settings (the model and the swarm are given separately)."""

    host: str = doc("127.0.0.1", "address the HTTP API listens on (0.0.0.0: every interface; then set a key)")
    port: int = doc(8000, "TCP port of the HTTP API; 0 picks a free port")
    served_model_name: str | None = doc(None, "the model name clients use in requests (default: the model "
                                              "directory's name)")
    api_key: str | None = doc(None, "require 'Authorization: Bearer KEY' on every /v1 request, /metrics and "
                                    "the dashboard at / (a browser signs in once; /health stays open) "
                                    "(default: no key)")
    max_concurrency: int = doc(32, "most generations running at once; further requests wait for a slot")
    max_waiting: int = doc(256, "most requests waiting for a slot; beyond that requests get 429")
    default_max_tokens: int = doc(512, "max_tokens of a request that gives none (bounded by the context left)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("--served-model-name must not be empty")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty")
        if self.max_concurrency < 1:
            raise ConfigError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_waiting < 0:
            raise ConfigError(f"--max-waiting must be >= 0, got {self.max_waiting}")
        if self.default_max_tokens < 1:
            raise ConfigError(f"--default-max-tokens must be >= 1, got {self.default_max_tokens}")

    @property
    def limits(self) -> HttpLimits:
        """The connection limits alone (what ``ApiServer`` takes)."""
        return HttpLimits(self.max_body_bytes, self.max_header_bytes, self.header_timeout, self.body_timeout,
                          self.keepalive_timeout)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) listens on this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to a public address


def exposure_warning(host: str, api_key: str | None, what: str = "the API") -> str | None:
    """The warning to print at start when ``what`` listens beyond loopback with no key; else None."""
    if api_key is not None or is_loopback(host):
        return None
    return (f"WARNING: {what} listens on {host} (not loopback) with no API key: anyone who can reach this "
            f"address can use it and see the swarm. Set --api-key or --api-key-file, or --host 127.0.0.1.")
