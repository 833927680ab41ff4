"""``ServerConfig``: what one block server serves and how much it takes on.

Contract: a frozen, validated dataclass whose field ``help`` becomes ``meshinfer serve`` flag help
(through ``cli.common.add_config_flags``). Values come only from explicit arguments; nothing here
reads files, the environment or the model (checks that need the checkpoint, such as the span fitting
the model, happen when the server opens it). Where to listen and whom to join is ``P2PConfig``.
``--blocks`` fixes the span (the server never moves); without it the span is placed automatically
(``--num-blocks`` long, or as long as memory allows) and re-checked every ``--rebalance-interval`` s.
Per-peer limits (``--max-sessions-per-peer``, ``--max-kv-tokens-per-peer``, ``--max-queued-steps-per-peer``)
keep one peer from taking the whole server; ``peer_sessions``/``peer_tokens`` resolve their defaults.
``--when idle`` / ``--schedule`` / ``--max-load`` make a lent machine owner-aware (``server.owner``).
``--metrics-port`` turns on the Prometheus endpoint (off by default: no extra listening port unless asked).
``--device`` is checked here only for its form (``devices.parse_device``, no torch); ``--dtype auto`` and
``--cache-tokens`` unset are resolved when the server starts (``server.device``): the dtype from the device
(fp32 on the CPU, bf16 on CUDA, fp16 on MPS), the KV budget ``CPU_CACHE_TOKENS`` on the CPU and, on a GPU,
what ``auto_cache_tokens`` (pure, here) fits in the device memory left once the span's weights are loaded.
A started server's config holds the resolved values (``resolved``); ``kv_budget`` refuses an unresolved one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from meshinfer.config import doc
from meshinfer.devices import DEVICE_HELP, kv_tokens_for, parse_device
from meshinfer.errors import ConfigError, UsageError
from meshinfer.ledger.priority import PriorityPolicy
from meshinfer.server.owner import OwnerPolicy, parse_schedule, threads_for
from meshinfer.types import QUANT_GROUP_SIZES, BlockRange, canonical_dtype, check_quant
from meshinfer.weights.rate import MB

CPU_CACHE_TOKENS = 16384
"""The KV budget (tokens) of a server on the CPU when ``--cache-tokens`` is not given."""
GPU_KV_FRACTION = 0.9
"""Share of a GPU's free memory (after the weights and the activation reserve) that an automatic KV budget takes;
the rest is the allocator's slack and what other processes may need."""
ACTIVATION_FACTOR = 4
"""The activation reserve of an automatic GPU KV budget: ``--max-step-tokens`` x (4 x hidden + 3 x intermediate)
x dtype bytes (a step's residual stream, attention and MLP temporaries) times this factor (slack for
fragmentation and the attention's own scratch)."""


def activation_reserve(step_tokens: int, hidden_size: int, intermediate_size: int, dtype_bytes: int) -> int:
    """Bytes kept free for the activations of the largest step (``ACTIVATION_FACTOR``'s formula)."""
    return step_tokens * (4 * hidden_size + 3 * intermediate_size) * dtype_bytes * ACTIVATION_FACTOR


def auto_cache_tokens(kind: str, free_bytes: int | None, kv_bytes_per_token: int, reserve_bytes: int) -> int:
    """The KV budget in tokens when ``--cache-tokens`` is unset, on a device of ``kind`` (cpu, cuda, mps) with
    ``free_bytes`` free AFTER the span's weights are loaded: ``CPU_CACHE_TOKENS`` on the CPU (or when the free
    memory is unknown), else ``GPU_KV_FRACTION`` of the free bytes less ``reserve_bytes`` in tokens of
    ``kv_bytes_per_token`` (0: nothing fits; the server refuses to start)."""
    if kind == "cpu" or free_bytes is None:
        return CPU_CACHE_TOKENS
    return kv_tokens_for(free_bytes, kv_bytes_per_token, fraction=GPU_KV_FRACTION, reserve_bytes=reserve_bytes,
                         at_most=2**40)


@dataclass(frozen=True)
class ServerConfig:
    """A block server: one span of one model, its KV memory budget and how it announces itself."""

    model: str | None = doc(None, "checkpoint directory to serve, a model id (its pieces are fetched from the "
                                  "swarm's seeders and verified) or 'demo' (the built-in demo model)")
    blocks: str | None = doc(None, "blocks to serve as START:END (half-open); 0:N serves the whole model. "
                                   "Unset: the server chooses where the swarm is weakest and moves when that helps")
    num_blocks: int | None = doc(None, "without --blocks: how many consecutive blocks to serve "
                                       "(default: as many as the available memory allows)")
    device: str = doc("auto", DEVICE_HELP)
    dtype: str = doc("auto", "compute dtype of the blocks and their KV cache: auto (fp32 on the CPU, bf16 on a CUDA "
                             "GPU, fp16 on MPS), fp32, fp16 or bf16")
    quant: str = doc("none", "how the span's weights are held in memory: none (as loaded, in --dtype), int8 (per "
                             "output channel) or int4 (in groups, see --quant-group-size); int8/int4 matrix products "
                             "run PyTorch's fused low-bit CPU kernels. Announced: a client's route uses one mode")
    quant_group_size: int | None = doc(None, "int4 group size: 32, 64, 128 or 256 (default: 64; a GGUF's own Q4_0/Q4_1 "
                                             "weights keep their groups of 32, never re-quantized)")
    max_sessions: int = doc(32, "most inference sessions open at once")
    cache_tokens: int | None = doc(None, "KV cache budget in tokens across all sessions (each reserves its max "
                                         f"length; default: {CPU_CACHE_TOKENS} on the CPU, on a GPU what fits in "
                                         f"{GPU_KV_FRACTION * 100:.0f} percent of its memory left after the weights)")
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
    when: str = doc("always", "always: serve while running; idle: give the machine back to its owner while other "
                              "processes use more than --busy-share of the CPU for --busy-for s (drain, stop taking "
                              "sessions), serve again after --idle-for s below it")
    busy_share: float = doc(0.5, "with --when idle: the share of the machine's CPU (0..1) used by other processes "
                                 "above which the owner counts as busy")
    busy_for: float = doc(5.0, "with --when idle: seconds the owner must stay busy before the server drains")
    idle_for: float = doc(30.0, "with --when idle: seconds the owner must stay idle before the server serves again")
    schedule: str | None = doc(None, "serve only in these local-time windows, e.g. 'mon-fri 18:00-08:00, sat-sun'; "
                                     "outside them the server drains and waits (default: any time)")
    max_load: float | None = doc(None, "the share of this machine's CPU cores (0..1] the server computes with: sets "
                                       "its torch threads to that share (excludes --torch-threads)")
    credits: bool = doc(True, "keep the usage receipts clients sign for this server's work (SQLite) and show them to "
                              "anyone; under contention give peers with more credit (work served minus used) more "
                              "decode slots (never all of them)")
    credit_to: str | None = doc(None, "the peer id of a client (e.g. your own `meshinfer generate --identity KEY`) "
                                      "that may spend the credit this server earns: other servers give its "
                                      "sessions that priority (default: none)")
    credit_weight: int = doc(4, "under contention, the most decode slots a peer with credit gets for each one a "
                                "peer without credit gets (1: credit buys nothing)")
    credit_saturation: int = doc(1_000_000, "credit, in block-tokens (tokens x blocks served minus used), at which a "
                                            "peer gets --credit-weight (logarithmic below it)")
    receipts_db: str | None = doc(None, "SQLite file of the receipts this server holds (default: "
                                        "<cache>/receipts/<peer id>.sqlite)")
    max_batch_sessions: int = doc(64, "most sessions one turn of the step loop computes together; more wait "
                                      "for the next turn")
    max_upload: float | None = doc(None, "cap the weight pieces this server sends to peers that fetch them, "
                                   "in MB/s (default: no cap)")
    max_download: float | None = doc(None, "cap the weight pieces this server fetches from the swarm when --model "
                                     "is a model id, in MB/s over all seeders (default: no cap)")
    compile: bool = doc(False, "CUDA only: run each session's one-token decode steps (when its turn computes it "
                               "alone) as a CUDA graph captured on its first decode step, so a step is one launch "
                               "instead of hundreds (worth it for launch-bound models; costs a capture per session)")
    metrics_port: int | None = doc(None, "serve Prometheus metrics over HTTP at /metrics on this port of --host "
                                         "(0 picks a free port; the ready line gives the URL); unset: no endpoint")
    sealed: bool = doc(False, "also take sealed requests (end-to-end encrypted to this server's key, announced in "
                              "its record) while serving every block (--blocks 0:N): loads the embeddings and LM "
                              "head too and generates whole here; relays and the network see only ciphertext")
    max_sealed: int = doc(2, "with --sealed: most sealed generations computed at once (each runs alone, between "
                             "the step loop's turns)")
    sealed_window: float = doc(300.0, "with --sealed: seconds a sealed request's timestamp may differ from this "
                                      "server's clock; request ids seen within it are refused as replays")
    sealed_relay: bool = doc(True, "forward other peers' sealed requests to the full node they name and its "
                                   "sealed answer back (ciphertext only; --no-sealed-relay: refuse)")
    sealed_relay_capture: str | None = doc(None, "testing and audits: append every payload this server relays "
                                                 "(what a relay sees) to this file")

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
        object.__setattr__(self, "device", str(parse_device(self.device)))
        if self.dtype.strip().lower() != "auto":
            object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        else:
            object.__setattr__(self, "dtype", "auto")
        object.__setattr__(self, "quant", check_quant(self.quant))
        if self.quant_group_size is not None and self.quant_group_size not in QUANT_GROUP_SIZES:
            raise ConfigError(f"--quant-group-size must be one of {', '.join(map(str, QUANT_GROUP_SIZES))}, "
                              f"got {self.quant_group_size}")
        if self.quant_group_size is not None and self.quant != "int4":
            raise ConfigError("--quant-group-size applies to --quant int4 only")
        if self.max_sessions <= 0:
            raise ConfigError(f"--max-sessions must be > 0, got {self.max_sessions}")
        if self.cache_tokens is not None and self.cache_tokens <= 0:
            raise ConfigError(f"--cache-tokens must be > 0, got {self.cache_tokens}")
        if self.max_sessions_per_peer is not None and self.max_sessions_per_peer <= 0:
            raise ConfigError(f"--max-sessions-per-peer must be > 0, got {self.max_sessions_per_peer}")
        kv = self.max_kv_tokens_per_peer
        if not (math.isfinite(kv) and kv > 0 and (kv <= 1 or kv == int(kv))):
            raise ConfigError(f"--max-kv-tokens-per-peer must be a fraction in (0, 1] of --cache-tokens or a whole "
                              f"number of tokens > 1, got {kv:g}")
        if self.max_queued_steps_per_peer <= 0:
            raise ConfigError(f"--max-queued-steps-per-peer must be > 0, got {self.max_queued_steps_per_peer}")
        if self.credit_to is not None and not re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{20,128}", self.credit_to):
            raise ConfigError(f"--credit-to must be a peer id (base58, e.g. 12D3KooW...), got {self.credit_to!r}")
        if self.credit_weight < 1:
            raise ConfigError(f"--credit-weight must be >= 1, got {self.credit_weight}")
        if self.credit_saturation < 1:
            raise ConfigError(f"--credit-saturation must be >= 1 block-token, got {self.credit_saturation}")
        if self.max_batch_sessions <= 0:
            raise ConfigError(f"--max-batch-sessions must be > 0, got {self.max_batch_sessions}")
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
        if not 1 <= self.max_sealed <= 1024:
            raise ConfigError(f"--max-sealed must be in 1..1024, got {self.max_sealed}")
        if not (math.isfinite(self.sealed_window) and 1 <= self.sealed_window <= 86400):
            raise ConfigError(f"--sealed-window must be 1..86400 seconds, got {self.sealed_window:g}")
        self.owner_policy()  # --when, --busy-share, --busy-for, --idle-for, --schedule: one-line errors
        if self.max_load is not None:
            if self.torch_threads is not None:
                raise ConfigError("--max-load and --torch-threads exclude each other: --max-load sets the threads")
            threads_for(self.max_load, 1)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        for name in ("public_name", "model_name"):
            value = getattr(self, name)
            if value is not None and not 0 < len(value) <= 256:
                raise ConfigError(f"--{name.replace('_', '-')} must be 1..256 characters")

    def owner_policy(self) -> OwnerPolicy:
        """When this server gives the machine back (``server.owner``)."""
        schedule = parse_schedule(self.schedule) if self.schedule is not None else None
        return OwnerPolicy(when=self.when, busy_share=self.busy_share, busy_for=self.busy_for, idle_for=self.idle_for,
                           schedule=schedule)

    def priority_policy(self) -> PriorityPolicy:
        """What credit buys on this server under contention (``ledger.priority``)."""
        return PriorityPolicy(max_weight=self.credit_weight, saturation=self.credit_saturation,
                              unit=max(1, self.credit_saturation // 1000))

    @property
    def owner_aware(self) -> bool:
        """True when the server watches its owner's load or a schedule."""
        return self.when == "idle" or self.schedule is not None

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
        return int(kv) if kv > 1 else max(1, int(self.kv_budget * kv))

    @property
    def kv_budget(self) -> int:
        """The KV budget in tokens, once resolved (``--cache-tokens``, or what the server sized at start)."""
        if self.cache_tokens is None:
            raise UsageError("the KV budget is sized when the server starts: use the started server's config")
        return self.cache_tokens

    def resolved(self, *, device: str, dtype: str, cache_tokens: int | None = None) -> ServerConfig:
        """This config with the device, the compute dtype and (when given) the KV budget the server resolved."""
        return replace(self, device=device, dtype=dtype,
                       cache_tokens=cache_tokens if cache_tokens is not None else self.cache_tokens)

    @property
    def max_download_bytes(self) -> float | None:
        """``--max-download`` in bytes/s (None: no cap)."""
        return self.max_download * MB if self.max_download is not None else None

    @property
    def auto_placement(self) -> bool:
        """True when the server chooses (and may change) its span itself."""
        return self.blocks is None
