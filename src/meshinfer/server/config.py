"""``ServerConfig``: what one block server serves and how much it takes on.

Contract: a frozen, validated dataclass whose field ``help`` becomes ``meshinfer serve`` flag help
(through ``cli.common.add_config_flags``). Values come only from explicit arguments; nothing here
reads files, the environment or the model (checks that need the checkpoint, such as the span fitting
the model, happen when the server opens it). Where to listen and whom to join is ``P2PConfig``.
``--blocks`` fixes the span (the server never moves); without it the span is placed automatically
(``--num-blocks`` long, or as long as memory allows) and re-checked every ``--rebalance-interval`` s.
Per-peer limits (``--max-sessions-per-peer``, ``--max-kv-tokens-per-peer``, ``--max-queued-steps-per-peer``)
keep one peer from taking the whole server; ``peer_sessions``/``peer_tokens`` resolve their defaults.
``--metrics-port`` turns on the Prometheus endpoint (off by default: no extra listening port unless asked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshinfer.config import doc
from meshinfer.errors import ConfigError
from meshinfer.types import QUANT_GROUP_SIZES, BlockRange, canonical_dtype, check_quant
from meshinfer.weights.rate import MB


@dataclass(frozen=True)
class ServerConfig:
    """A block server: one span of one model, its KV memory budget and how it announces itself."""

    model: str | None = doc(None, "checkpoint directory to serve, a model id (its pieces are fetched from the "
                                  "swarm's seeders and verified) or 'demo' (the built-in demo model)")
    blocks: str | None = doc(None, "blocks to serve as START:END (half-open); 0:N serves the whole model. "
                                   "Unset: the server chooses where the swarm is weakest and moves when that helps")
    num_blocks: int | None = doc(None, "without --blocks: how many consecutive blocks to serve "
                                       "(default: as many as the available memory allows)")
    dtype: str = doc("float32", "compute dtype of the blocks and their KV cache: fp32, fp16 or bf16")
    quant: str = doc("none", "how the span's weights are held in memory: none (as loaded, in --dtype), int8 (per "
                             "output channel) or int4 (in groups, see --quant-group-size); int8/int4 matrix products "
                             "run PyTorch's fused low-bit CPU kernels. Announced: a client's route uses one mode")
    quant_group_size: int | None = doc(None, "int4 group size: 32, 64, 128 or 256 (default: 64; a GGUF's own Q4_0/Q4_1 "
                                             "weights keep their groups of 32, never re-quantized)")
    max_sessions: int = doc(32, "most inference sessions open at once")
    cache_tokens: int = doc(16384, "KV cache budget in tokens across all sessions (each reserves its max length)")
    max_sessions_per_peer: int | None = doc(
        None, "most sessions one peer (the authenticated peer id that opens them) may hold open here at once; "
              "refusals name this limit (default: half of --max-sessions, so one peer never takes every slot while "
              "a gateway serving many users from one peer id keeps its usual concurrency)")
    max_kv_tokens_per_peer: float = doc(
        0.5, "most KV cache tokens the sessions of one peer may reserve together: a fraction of --cache-tokens "
             "when <= 1, else a number of tokens; below 1 no peer can take the whole budget")
    max_queued_steps_per_peer: int = doc(256, "most steps of one peer's sessions waiting in the step loop at once; "
                                              "more are refused until its earlier steps are done")
    max_step_tokens: int = doc(2048, "most tokens one step (prefill chunk) may carry")
    session_idle_timeout: float = doc(300.0, "seconds a session may stay without steps before it is closed")
    public_name: str | None = doc(None, "a name shown to others in the swarm table (optional)")
    model_name: str | None = doc(None, "human name of the model (default: the directory name)")
    announce_ttl: float = doc(60.0, "seconds this server's DHT records live unless refreshed")
    announce_refresh: float = doc(20.0, "seconds between refreshes of this server's DHT records")
    torch_threads: int | None = doc(None, "CPU threads torch may use for compute (default: torch's own choice); "
                                          "use 1-2 when several servers share one machine")
    rebalance_interval: float = doc(30.0, "without --blocks: seconds between checks whether moving to other blocks "
                                          "would speed up the swarm (jittered by up to 20 percent; 0: never move)")
    balance_quality: float = doc(0.75, "move only when the swarm's slowest block is now below this fraction of "
                                       "what it would be after the move (0 < q <= 1)")
    drain_timeout: float = doc(30.0, "seconds open sessions may take to finish when the server leaves or moves; "
                                     "after that they are ended with an error so their clients fail over")
    max_upload: float | None = doc(None, "cap the weight pieces this server sends to peers that fetch them, "
                                   "in MB/s (default: no cap)")
    max_download: float | None = doc(None, "cap the weight pieces this server fetches from the swarm when --model "
                                     "is a model id, in MB/s over all seeders (default: no cap)")
    metrics_port: int | None = doc(None, "serve Prometheus metrics over HTTP at /metrics on this port of --host "
                                         "(0 picks a free port; the ready line gives the URL); unset: no endpoint")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("--model is required (a checkpoint directory, or 'demo')")
        if self.blocks is not None:
            if self.num_blocks is not None:
                raise ConfigError("--blocks and --num-blocks exclude each other: --blocks fixes the span, "
                                  "--num-blocks sizes an automatically placed one")
            BlockRange.parse(self.blocks)
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"--num-blocks must be > 0, got {self.num_blocks}")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "quant", check_quant(self.quant))
        if self.quant_group_size is not None and self.quant_group_size not in QUANT_GROUP_SIZES:
            raise ConfigError(f"--quant-group-size must be one of {', '.join(map(str, QUANT_GROUP_SIZES))}, "
                              f"got {self.quant_group_size}")
        if self.quant_group_size is not None and self.quant != "int4":
            raise ConfigError("--quant-group-size applies to --quant int4 only")
        if self.max_sessions <= 0:
            raise ConfigError(f"--max-sessions must be > 0, got {self.max_sessions}")
        if self.cache_tokens <= 0:
            raise ConfigError(f"--cache-tokens must be > 0, got {self.cache_tokens}")
        if self.max_sessions_per_peer is not None and self.max_sessions_per_peer <= 0:
            raise ConfigError(f"--max-sessions-per-peer must be > 0, got {self.max_sessions_per_peer}")
        kv = self.max_kv_tokens_per_peer
        if not (math.isfinite(kv) and kv > 0 and (kv <= 1 or kv == int(kv))):
            raise ConfigError(f"--max-kv-tokens-per-peer must be a fraction in (0, 1] of --cache-tokens or a whole "
                              f"number of tokens > 1, got {kv:g}")
        if self.max_queued_steps_per_peer <= 0:
            raise ConfigError(f"--max-queued-steps-per-peer must be > 0, got {self.max_queued_steps_per_peer}")
        if self.max_step_tokens <= 0:
            raise ConfigError(f"--max-step-tokens must be > 0, got {self.max_step_tokens}")
        if not self.session_idle_timeout > 0:
            raise ConfigError(f"--session-idle-timeout must be > 0, got {self.session_idle_timeout}")
        if not 0 < self.announce_refresh < self.announce_ttl:
            raise ConfigError(
                f"--announce-refresh ({self.announce_refresh:g}) must be > 0 and shorter than "
                f"--announce-ttl ({self.announce_ttl:g})"
            )
        if self.max_upload is not None and not self.max_upload > 0:
            raise ConfigError(f"--max-upload must be > 0 MB/s, got {self.max_upload:g}")
        if self.max_download is not None and not self.max_download > 0:
            raise ConfigError(f"--max-download must be > 0 MB/s, got {self.max_download:g}")
        if self.torch_threads is not None and self.torch_threads <= 0:
            raise ConfigError(f"--torch-threads must be > 0, got {self.torch_threads}")
        if not math.isfinite(self.rebalance_interval) or not (
                self.rebalance_interval == 0 or self.rebalance_interval >= 1):
            raise ConfigError(f"--rebalance-interval must be 0 (never move) or at least 1 second, "
                              f"got {self.rebalance_interval:g}")
        if not 0 < self.balance_quality <= 1:  # also refuses nan
            raise ConfigError(f"--balance-quality must be in (0, 1], got {self.balance_quality:g}")
        if not (math.isfinite(self.drain_timeout) and self.drain_timeout >= 0):
            raise ConfigError(f"--drain-timeout must be a number of seconds >= 0, got {self.drain_timeout:g}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        for name in ("public_name", "model_name"):
            value = getattr(self, name)
            if value is not None and not 0 < len(value) <= 256:
                raise ConfigError(f"--{name.replace('_', '-')} must be 1..256 characters")

    @property
    def span(self) -> BlockRange | None:
        """The fixed span given with ``--blocks``; None when the server places itself."""
        return None if self.blocks is None else BlockRange.parse(self.blocks)

    @property
    def peer_sessions(self) -> int:
        """``--max-sessions-per-peer`` resolved: the most sessions one peer may hold."""
        if self.max_sessions_per_peer is not None:
            return self.max_sessions_per_peer
        return max(1, self.max_sessions // 2)

    @property
    def peer_tokens(self) -> int:
        """``--max-kv-tokens-per-peer`` resolved to tokens: the most KV tokens one peer may reserve."""
        kv = self.max_kv_tokens_per_peer
        return int(kv) if kv > 1 else max(1, int(self.cache_tokens * kv))

    @property
    def max_download_bytes(self) -> float | None:
        """``--max-download`` in bytes/s (None: no cap)."""
        return self.max_download * MB if self.max_download is not None else None

    @property
    def auto_placement(self) -> bool:
        """True when the server chooses (and may change) its span itself."""
        return self.blocks is None
