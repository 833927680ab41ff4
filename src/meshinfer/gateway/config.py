"""``GatewayConfig``: how the OpenAI-compatible gateway serves (address, key, limits).

Contract: a validated, self-documenting dataclass (field ``help`` becomes ``meshinfer api`` flag help);
values come only from explicit arguments, nothing is read from the environment or files here. Imports
only ``meshinfer.config`` and ``meshinfer.errors``.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshinfer.config import doc
from meshinfer.errors import ConfigError


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway's settings (the model and the swarm are given separately)."""

    host: str = doc("127.0.0.1", "address the HTTP API listens on (0.0.0.0: every interface)")
    port: int = doc(8000, "TCP port of the HTTP API; 0 picks a free port")
    served_model_name: str | None = doc(None, "the model name clients use in requests (default: the model "
                                              "directory's name)")
    api_key: str | None = doc(None, "require 'Authorization: Bearer KEY' on every /v1 request (default: no key)")
    max_concurrency: int = doc(32, "most generations running at once; further requests wait for a slot")
    max_waiting: int = doc(256, "most requests waiting for a slot; beyond that requests get 429")
    default_max_tokens: int = doc(512, "max_tokens of a request that gives none (bounded by the context left)")

    def __post_init__(self) -> None:
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
