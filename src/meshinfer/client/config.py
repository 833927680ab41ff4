"""``ClientConfig``: how a swarm client joins, routes, waits and recovers.

Contract: a frozen, validated dataclass (``ServerConfig``'s twin for the client side) holding every tunable of
``DistributedModel`` and its ``InferenceSession``s; the defaults are the values the client has always used. Field
``help`` becomes the flag help of ``meshinfer generate``/``chat``/``api`` (``cli.common.add_config_flags``, minus
``CLI_SKIP``: fields those commands already spell their own way). ``device`` (default ``auto``) is checked for its
form only (``devices.parse_device``); the client resolves it on the machine (``models.device``). Values come only
from explicit arguments; nothing here reads files or the environment, and nothing imports torch or the network.
``DistributedModel.from_pretrained(..., config=..., **overrides)`` applies its keyword arguments with
``dataclasses.replace``; its ``InferenceSession``s get the same object (their own ``quant`` is their route's mode,
given apart). ``private_blocks`` is checked for its sign here; against the model's block count (2K < n) where that
is known (``client.private_split.private_middle``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from meshinfer.config import P2PConfig, doc, field_help
from meshinfer.devices import DEVICE_HELP, parse_device
from meshinfer.errors import ConfigError
from meshinfer.types import check_quant

DEFAULT_COHORTS: Final = 2
"""LM-head cohorts of a client (``client.head_batch.HeadBatcher``) unless told otherwise."""

CLI_SKIP: Final = ("host", "max_download", "quant", "head_quant")
"""Fields the client commands do not take as ``add_config_flags`` flags: ``--quant`` (with ``auto``),
``--head-quant`` and ``--max-download`` (MB/s) have their own spelling there, and ``--host`` is the gateway's
HTTP address."""

LOCAL_FIELDS: Final = ("device",)
"""Fields whose flags apply to a model run wholly on this machine too (``meshinfer generate``/``chat`` without
``--initial-peers``), so they are listed with the command's own flags rather than the swarm client's."""


@dataclass(frozen=True)
class ClientConfig:
    """A swarm client: its peer, how long it waits for what, how sessions run and recover."""

    device: str = doc("auto", DEVICE_HELP + "; through a swarm, where the embeddings and LM head held here compute")
    host: str = doc("127.0.0.1", "address the client's peer listens on")
    dht_timeout: float = doc(5.0, "seconds a read of the swarm's records (model coverage) may take")
    join_timeout: float = doc(60.0, "seconds joining the swarm through the initial peers may take")
    fetch_timeout: float = doc(3600.0, "seconds fetching a model id's client part from the swarm may take")
    close_timeout: float = doc(15.0, "seconds leaving the swarm may take before the client stops regardless")
    route_wait: float = doc(3.0, "seconds to wait for servers to cover the model before a route fails")
    open_timeout: float = doc(15.0, "seconds opening a session on one server may take")
    step_timeout: float = doc(60.0, "seconds one step through the whole route may take")
    push: bool = doc(True, "servers push each step's output to the next server of the route "
                           "(--no-push: the client drives every hop itself)")
    failover: bool = doc(True, "replace a failed server mid-generation, replaying its history "
                               "(--no-failover: fail instead)")
    max_failovers: int = doc(8, "most servers replaced within one step before it fails")
    min_stall: float = doc(3.0, "seconds without progress after which a server counts as stalled and is "
                                "replaced, at least (the limit adapts to the usual time per token)")
    max_chunk_tokens: int = doc(2048, "most tokens of one step: longer prompts are sent in chunks")
    spread: bool = doc(True, "spread sessions over equivalent servers at random, weighted by their measured speed "
                             "and announced free capacity (--no-spread: always the single cheapest route)")
    prior_cap: float = doc(1.5, "a server's announced throughput counts for at most this many times the median "
                                "of the others' until this client has measured it (routes use measured figures)")
    refuted_ban: float = doc(60.0, "seconds a server is not routed to after its record proved false (it refused "
                                   "the blocks it announces, or none of its addresses could be dialled); each "
                                   "repeat multiplies it by 4, up to an hour")
    cohorts: int = doc(DEFAULT_COHORTS, "groups in which concurrent generations move through the route, each "
                                        "one LM-head batch on this machine")
    max_download: float | None = doc(None, "when the model is a model id: cap the fetch of its config, tokenizer "
                                           "and client part, in bytes/s (default: no cap)")
    quant: str | None = doc(None, "which servers' weights every route uses: none, int8 or int4 (default: the most "
                                  "precise mode that covers the model, fixed per session)")
    audit: bool = doc(True, "audit the servers of each session: shadow sessions on independent servers of the same "
                            "span recompute every hop's outputs; a liar is banned and the generation rolled back "
                            "(--no-audit: trust every server; tokens then stream without the audit delay)")
    audit_every: int = doc(16, "tokens between two checks of an audited hop (each check: one step on its shadow)")
    audit_fraction: float = doc(1.0, "probability that a hop of a session is audited (0..1)")
    audit_in_flight: int = doc(4, "most audit checks of one session running at once")
    audit_report: bool = doc(True, "publish a signed report in the DHT when an audit, confirmed by a third server, "
                                   "catches a server lying; other peers re-verify it before they believe it")
    speculate: bool = doc(True, "speculative decoding where it pays (generations of 8+ tokens): prompt-lookup drafts "
                                "verified by the route in one trip, rejected positions rolled back; same greedy "
                                "tokens, same sampled tokens for a seed (--no-speculate: one token per trip)")
    draft_tokens: int = doc(6, "most draft tokens one speculative step verifies (1..32)")
    speculate_busy_sessions: int = doc(4, "with more generations than this decoding at once on this client, "
                                          "speculative steps draft only where the last 3 tokens repeat earlier "
                                          "text (a copy in progress); in a full batch a draft costs the servers a "
                                          "token's compute instead of saving a trip; 0: no limit", metavar="N")
    head_quant: str = doc("none", "how this machine holds the embeddings and LM head: none, int8 or int4")
    private_blocks: int = doc(0, "a private split: run the model's first K and last K blocks on this machine too "
                                 "(with the embeddings and LM head), so servers never see token embeddings nor "
                                 "the hidden states next to the logits; routes cover only the middle blocks; "
                                 "0: off", metavar="K")
    report_check_s: float = doc(60.0, "seconds between two checks of the model's published reports (each new one "
                                      "verified; a verified one makes routes avoid the accused); 0: never check")
    identity: str | None = doc(None, "path of this client's peer key file (created with mode 0600 if absent): the "
                                     "peer id its receipts are signed with, whose credit servers weigh (default: a "
                                     "new key each run); a server's --credit-to names it")
    receipts: bool = doc(True, "sign usage receipts for the work servers do for this client and hand them to them "
                               "(what credits are computed from; costs one signature per server every 64 tokens)")
    swarm_key: str | None = doc(None, field_help(P2PConfig, "swarm_key"), metavar="FILE")
    swarm_allow: str | None = doc(None, field_help(P2PConfig, "swarm_allow"), metavar="FILE")
    publish_audits: bool = doc(True, "publish this client's audit tally (passed/failed per server) in the DHT for "
                                     "`meshinfer swarm` and dashboards")
    sealed: bool = doc(False, "send each generation sealed (end-to-end encrypted) to one full node that takes sealed "
                              "requests, which generates it whole; relays and the network see only ciphertext and "
                              "sizes, the full node sees the prompt (it computes on it)")
    sealed_relay: str = doc("", "with --sealed: reach the full node through this relaying peer (a peer id, a multiaddr "
                                "ending in /p2p/<peer id>, or 'auto': another online server of the model); empty: "
                                "directly")
    prompt_cache_sessions: int = doc(0, "finished sessions kept open (idle) so that a later prompt sharing their "
                                        "tokens' prefix (the next turn of a chat) continues them and sends only "
                                        "the rest; the least recently used is closed beyond this many; 0: off "
                                        "(not with --private-blocks or --sealed; meshinfer api keeps 8 unless this "
                                        "flag says otherwise)")
    prompt_cache_ttl: float = doc(60.0, "seconds a kept session may idle before it is closed (servers close idle "
                                        "sessions after their --session-idle-timeout, default 300)")
    prompt_cache_headroom: int = doc(512, "with --prompt-cache-sessions: tokens beyond prompt + new tokens each "
                                          "session reserves on its servers (up to the model's context), room for "
                                          "a next turn")

    def __post_init__(self) -> None:
        if not self.device.strip():
            raise ConfigError("device must not be empty (e.g. 'auto' or 'cpu')")
        parse_device(self.device)  # the form only: whether this machine has it is models.device.resolve_device's
        if not self.host.strip():
            raise ConfigError("host must not be empty (e.g. '127.0.0.1')")
        for name in ("dht_timeout", "join_timeout", "fetch_timeout", "close_timeout", "open_timeout",
                     "step_timeout", "min_stall"):
            value = getattr(self, name)
            if not value > 0:  # also refuses nan
                raise ConfigError(f"--{_flag(name)} must be > 0 seconds, got {value:g}")
        if not self.route_wait >= 0:
            raise ConfigError(f"--route-wait must be >= 0 seconds, got {self.route_wait:g}")
        if not self.prior_cap >= 1:
            raise ConfigError(f"--prior-cap must be >= 1, got {self.prior_cap:g}")
        if not (self.refuted_ban > 0 and self.refuted_ban < float("inf")):
            raise ConfigError(f"--refuted-ban must be > 0 seconds and finite, got {self.refuted_ban:g}")
        if self.max_failovers < 0:
            raise ConfigError(f"--max-failovers must be >= 0, got {self.max_failovers}")
        if self.max_chunk_tokens <= 0:
            raise ConfigError(f"--max-chunk-tokens must be > 0, got {self.max_chunk_tokens}")
        if self.audit_every < 1:
            raise ConfigError(f"--audit-every must be >= 1 token, got {self.audit_every}")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ConfigError(f"--audit-fraction must be between 0 and 1, got {self.audit_fraction:g}")
        if self.audit_in_flight < 1:
            raise ConfigError(f"--audit-in-flight must be >= 1, got {self.audit_in_flight}")
        if not 0 <= self.report_check_s < float("inf"):
            raise ConfigError(f"--report-check-s must be >= 0 seconds (0: off), got {self.report_check_s:g}")
        if not 1 <= self.draft_tokens <= 32:
            raise ConfigError(f"--draft-tokens must be in 1..32, got {self.draft_tokens}")
        if self.speculate_busy_sessions < 0:
            raise ConfigError(f"--speculate-busy-sessions must be >= 0 (0: no limit), got "
                              f"{self.speculate_busy_sessions}")
        if self.private_blocks < 0:
            raise ConfigError(f"--private-blocks must be >= 0 (0: off), got {self.private_blocks}")
        if self.prompt_cache_sessions < 0:
            raise ConfigError(f"--prompt-cache-sessions must be >= 0 (0: off), got {self.prompt_cache_sessions}")
        if not 0 < self.prompt_cache_ttl < float("inf"):
            raise ConfigError(f"--prompt-cache-ttl must be > 0 seconds and finite, got {self.prompt_cache_ttl:g}")
        if self.prompt_cache_headroom < 0:
            raise ConfigError(f"--prompt-cache-headroom must be >= 0 tokens, got {self.prompt_cache_headroom}")
        if self.cohorts < 1:
            raise ConfigError(f"--cohorts must be >= 1, got {self.cohorts}")
        if self.max_download is not None and not self.max_download > 0:
            raise ConfigError(f"max_download must be > 0 bytes/s, got {self.max_download:g}")
        relay = self.sealed_relay.strip()
        peer = relay.rsplit("/p2p/", 1)[-1] if relay.startswith("/") else relay
        if relay and relay != "auto" and not (peer.isalnum() and 16 <= len(peer) <= 128 and len(relay) <= 512):
            raise ConfigError(f"--sealed-relay must be a peer id, a multiaddr ending in /p2p/<peer id> or 'auto', "
                              f"got {relay[:60]!r}")
        if relay and not self.sealed:
            raise ConfigError("--sealed-relay applies to sealed requests: add --sealed")
        object.__setattr__(self, "sealed_relay", relay)
        if self.quant is not None:
            object.__setattr__(self, "quant", check_quant(self.quant))
        object.__setattr__(self, "head_quant", check_quant(self.head_quant))


DEFAULT_CLIENT_CONFIG: Final = ClientConfig()
"""``ClientConfig()``: the defaults, one shared (frozen) instance."""


def _flag(name: str) -> str:
    return name.replace("_", "-")
