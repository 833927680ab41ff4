"""``ServerConfig``: what one block server serves and how much it takes on.

Contract: a frozen, validated dataclass whose field ``help`` becomes ``meshinfer serve`` flag help
(through ``cli.common.add_config_flags``). Values come only from explicit arguments; nothing here
reads files, the environment or the model (checks that need the checkpoint, such as the span fitting
the model, happen when the server opens it). Where to listen and whom to join is ``P2PConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshinfer.config import doc
from meshinfer.errors import ConfigError
from meshinfer.types import BlockRange, canonical_dtype


@dataclass(frozen=True)
class ServerConfig:
    """A block server: one span of one model, its KV memory budget and how it announces itself."""

    model: str | None = doc(None, "checkpoint directory to serve (or 'demo' for the built-in demo model)")
    blocks: str | None = doc(None, "blocks to serve as START:END (half-open); 0:N serves the whole model")
    dtype: str = doc("float32", "compute dtype of the blocks and their KV cache: fp32, fp16 or bf16")
    max_sessions: int = doc(32, "most inference sessions open at once")
    cache_tokens: int = doc(16384, "KV cache budget in tokens across all sessions (each reserves its max length)")
    max_step_tokens: int = doc(2048, "most tokens one step (prefill chunk) may carry")
    session_idle_timeout: float = doc(300.0, "seconds a session may stay without steps before it is closed")
    public_name: str | None = doc(None, "a name shown to others in the swarm table (optional)")
    model_name: str | None = doc(None, "human name of the model (default: the directory name)")
    announce_ttl: float = doc(60.0, "seconds this server's DHT records live unless refreshed")
    announce_refresh: float = doc(20.0, "seconds between refreshes of this server's DHT records")
    torch_threads: int | None = doc(None, "CPU threads torch may use for compute (default: torch's own choice); "
                                          "use 1-2 when several servers share one machine")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("--model is required (a checkpoint directory, or 'demo')")
        if not self.blocks:
            raise ConfigError("--blocks is required (START:END, e.g. 0:4)")
        BlockRange.parse(self.blocks)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.max_sessions <= 0:
            raise ConfigError(f"--max-sessions must be > 0, got {self.max_sessions}")
        if self.cache_tokens <= 0:
            raise ConfigError(f"--cache-tokens must be > 0, got {self.cache_tokens}")
        if self.max_step_tokens <= 0:
            raise ConfigError(f"--max-step-tokens must be > 0, got {self.max_step_tokens}")
        if not self.session_idle_timeout > 0:
            raise ConfigError(f"--session-idle-timeout must be > 0, got {self.session_idle_timeout}")
        if not 0 < self.announce_refresh < self.announce_ttl:
            raise ConfigError(
                f"--announce-refresh ({self.announce_refresh:g}) must be > 0 and shorter than "
                f"--announce-ttl ({self.announce_ttl:g})"
            )
        if self.torch_threads is not None and self.torch_threads <= 0:
            raise ConfigError(f"--torch-threads must be > 0, got {self.torch_threads}")
        for name in ("public_name", "model_name"):
            value = getattr(self, name)
            if value is not None and not 0 < len(value) <= 256:
                raise ConfigError(f"--{name.replace('_', '-')} must be 1..256 characters")

    @property
    def span(self) -> BlockRange:
        return BlockRange.parse(self.blocks or "")
