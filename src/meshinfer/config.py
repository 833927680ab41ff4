"""Configuration classes: typed, validated, and self-documenting.

Contract: plain dataclasses whose field docs (``help`` metadata) become CLI help. Values are only
ever read from arguments given explicitly (CLI flags, Python calls); nothing here reads the
environment or files at import time. ``cache_root()`` decides where meshinfer keeps its caches: it is the
one place that reads ``$MESHINFER_CACHE_DIR`` (at call time). Imports only leaves.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from meshinfer.errors import ConfigError

CACHE_DIR_ENV: Final = "MESHINFER_CACHE_DIR"


def cache_root() -> Path:
    """Where meshinfer keeps its caches (fingerprints, fetched and pulled models, GGUF views, test checkpoints,
    each in a subdirectory): ``$MESHINFER_CACHE_DIR`` when set and not empty, else ``~/.cache/meshinfer``. Read
    at each call, never at import, and nowhere else."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "meshinfer"


def doc(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with a default and help text (shown by ``--help``)."""
    return field(default=default, metadata={"help": help, **extra})


def field_help(cls: type, name: str) -> str:
    """The help text of config field ``name`` of dataclass ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits."""

    temperature: float = doc(0.0, "sampling temperature; 0 means greedy (argmax)")
    top_k: int = doc(0, "keep only the K most likely tokens before sampling; 0 disables")
    top_p: float = doc(1.0, "nucleus sampling: keep the smallest set of tokens with mass >= P; 1 disables")
    repetition_penalty: float = doc(1.0, "divide (multiply if negative) logits of seen tokens; 1 disables")
    seed: int | None = doc(None, "random seed for sampling (same seed, same tokens)")
    presence_penalty: float = doc(0.0, "subtract P from the logit of every token already generated (OpenAI's "
                                       "presence_penalty, in [-2, 2]; the prompt does not count); 0 disables",
                                       metavar="P")
    frequency_penalty: float = doc(0.0, "subtract F times its count from the logit of every token already generated "
                                        "(OpenAI's frequency_penalty, in [-2, 2]; the prompt does not count); 0 "
                                        "disables", metavar="F")
    min_p: float = doc(0.0, "drop tokens less likely than P times the most likely one (after temperature, "
                            "top-k and top-p; in [0, 1]); 0 disables")
    logit_bias: tuple[tuple[int, float], ...] = doc((), "add BIAS (in [-100, 100]) to token ID's logit before "
                                                        "anything else, e.g. --logit-bias 42=5.5 7=-100 (-100 "
                                                        "bans a token, +100 all but forces it)", metavar="ID=BIAS")

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0.0:
            raise ConfigError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [-2, 2], got {value}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"--min-p must be in [0, 1], got {self.min_p}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ConfigError(f"--logit-bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        seen: set[int] = set()
        for token, bias in self.logit_bias:
            if token < 0:
                raise ConfigError(f"--logit-bias: token ids must be >= 0, got {token}")
            if not -100.0 <= bias <= 100.0:
                raise ConfigError(f"--logit-bias: the bias of token {token} must be in [-100, 100], got {bias}")
            if token in seen:
                raise ConfigError(f"--logit-bias: token {token} is given twice")
            seen.add(token)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


MAX_LOGIT_BIAS: Final = 1024
"""The most tokens ``SamplingConfig.logit_bias`` may bias (the OpenAI API's limit)."""


def parse_logit_bias(items: tuple[str, ...] | list[str]) -> tuple[tuple[int, float], ...]:
    """``--logit-bias ID=BIAS ...`` as (token id, bias) pairs; a ConfigError naming the flag for a malformed item."""
    pairs: list[tuple[int, float]] = []
    for item in items:
        token, sep, bias = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(token), float(bias)))
        except ValueError:
            raise ConfigError(f"--logit-bias takes ID=BIAS pairs (a token id, '=', a number), e.g. 42=-100; "
                              f"got {item!r}") from None
    return tuple(pairs)


@dataclass(frozen=True)
class P2PConfig:
    """How a process joins the swarm."""

    host: str = doc("127.0.0.1", "address to listen on for peer connections")
    port: int = doc(0, "TCP port to listen on; 0 picks a free port")
    identity: str | None = doc(None, "path of this peer's private key file (created with mode 0600 if absent)")
    initial_peers: tuple[str, ...] = doc((), "multiaddrs of peers to join through; none starts a new swarm")
    direct: bool = doc(True, "also carry session streams over the direct data plane (TLS 1.3 over TCP, both ends "
                             "authenticated by their peer keys), much faster than libp2p streams; libp2p stays "
                             "the fallback")
    direct_port: int = doc(0, "TCP port of the direct data plane (servers listen there); 0 picks a free port")
    max_streams: int = doc(512, "most incoming session streams served at once, over the direct plane and libp2p "
                                "together; more are refused with a message naming this limit")
    max_streams_per_peer: int = doc(64, "most incoming session streams one peer may hold open at once (both "
                                        "planes together)")
    max_buffer_mb: int = doc(256, "most MiB that unfinished incoming messages of all peers together may buffer; "
                                  "a message that would pass it is refused and its stream closed")
    max_buffer_mb_per_peer: int = doc(64, "most MiB that one peer's unfinished incoming messages may buffer "
                                          "(over all its streams)")
    max_handshakes: int = doc(64, "most incoming direct-plane connections in their handshake at once; more are "
                                  "closed at once")
    mdns: bool = doc(True, "find peers on this LAN by mDNS (zero configuration): without --initial-peers, browse "
                           "for --mdns-browse-s seconds and join what answers; a server or DHT peer bound to a LAN "
                           "address also advertises itself and joins peers found later (one bound to loopback is "
                           "on no LAN: it neither advertises nor browses; clients browse from any address). "
                           "--no-mdns turns both off")
    mdns_browse_s: float = doc(3.0, "seconds to browse the LAN by mDNS for peers when no --initial-peers are given")
    announce: tuple[str, ...] = doc((), "addresses others should dial to reach this peer's libp2p plane, when they "
                                        "differ from what it binds (a port forward, a public IP, one of several "
                                        "interfaces): /ip4/H/tcp/P, /dns4/NAME/tcp/P or HOST:PORT (HOST alone uses "
                                        "--port, which must then be fixed); they replace the bound addresses in "
                                        "what this peer announces (DHT, LAN advert). Default: the bound addresses "
                                        "(a 0.0.0.0 bind announces each interface's address)", metavar="ADDR")
    direct_announce: str | None = doc(None, "HOST:PORT others should dial for this server's direct data plane (e.g. "
                                            "a port forward to --direct-port; HOST alone uses --direct-port, which "
                                            "must then be fixed); when given it is the only direct address the "
                                            "server announces. Default: the bound address", metavar="HOST:PORT")
    relay: bool = doc(True, "use libp2p circuit relays (v2): dial peers that are reachable only through a relay, "
                            "and, for a server or DHT peer that libp2p's AutoNAT finds unreachable (or --nat private), "
                            "reserve a slot on a relay (its initial peers; without them, peers found in the DHT) "
                            "and announce the relayed address; libp2p also tries hole punching (DCUtR) then. "
                            "--no-relay never uses relays (a peer behind NAT then cannot serve)")
    nat: str = doc("auto", "whether this peer is behind a NAT: 'auto' (libp2p's AutoNAT asks peers to dial it back, "
                           "which can take minutes), 'private' (behind NAT: with relays on, reserve a slot on a relay "
                           "at once) or 'public' (reachable: never reserve one)", metavar="auto|private|public")
    relay_hop: bool | None = doc(None, "relay for other peers (a circuit relay v2 service, bounded by p2pd: 16 "
                                       "circuits per peer, 30 min and 4 GiB per circuit). Default: on for servers "
                                       "and DHT peers bound to a non-loopback address or with --announce, off on "
                                       "loopback and for clients. Off, p2pd still answers with libp2p's default relay, "
                                       "limited to 2 min and 128 KiB per circuit")
    swarm_key: str | None = doc(None, "path of a private swarm's key file (`meshinfer swarm-key new --out FILE`): "
                                      "only peers holding the same key can join, read or write its records and "
                                      "open streams to its peers; give it to every command of that swarm. "
                                      "Default: a public swarm", metavar="FILE")
    swarm_allow: str | None = doc(None, "path of a private swarm's allow-list (`meshinfer swarm-key allow`: peer ids "
                                        "signed by the swarm's owner), instead of --swarm-key: only the owner and "
                                        "the listed peers, each proving its own key, can join, use its DHT and open "
                                        "streams to its peers", metavar="FILE")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if not 0 <= self.direct_port <= 65535:
            raise ConfigError(f"--direct-port must be in 0..65535, got {self.direct_port}")
        for name in ("max_streams", "max_streams_per_peer", "max_buffer_mb", "max_buffer_mb_per_peer",
                     "max_handshakes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 < self.mdns_browse_s <= 60:
            raise ConfigError(f"--mdns-browse-s must be in (0, 60], got {self.mdns_browse_s}")
        if self.max_streams_per_peer > self.max_streams:
            raise ConfigError(f"--max-streams-per-peer ({self.max_streams_per_peer}) must be <= --max-streams "
                              f"({self.max_streams})")
        for text in self.announce:
            announce_maddr(text, self.port)
        if self.direct_announce is not None:
            if not self.direct:
                raise ConfigError("--direct-announce needs the direct plane: drop --no-direct")
            split_host_port(self.direct_announce, "--direct-announce", self.direct_port, "--direct-port")
        if self.nat not in ("auto", "private", "public"):
            raise ConfigError(f"--nat must be auto, private or public, got {self.nat!r}")
        if self.relay_hop and not self.relay:
            raise ConfigError("--relay-hop needs relays: drop --no-relay")
        if self.swarm_key is not None and self.swarm_allow is not None:
            raise ConfigError("give --swarm-key or --swarm-allow, not both (a swarm admits by one of them)")
        if self.swarm_allow is not None and not self.swarm_allow.strip():
            raise ConfigError("--swarm-allow needs the path of an allow-list file (`meshinfer swarm-key allow`)")
        if self.swarm_key is not None and not self.swarm_key.strip():
            raise ConfigError("--swarm-key needs the path of a key file (make one with `meshinfer swarm-key new`)")
        if self.max_buffer_mb_per_peer > self.max_buffer_mb:
            raise ConfigError(f"--max-buffer-mb-per-peer ({self.max_buffer_mb_per_peer}) must be <= "
                              f"--max-buffer-mb ({self.max_buffer_mb})")

    @property
    def announce_maddrs(self) -> tuple[str, ...]:
        """``announce`` as multiaddrs (``/ip4/H/tcp/P`` ...), in order, without duplicates."""
        return tuple(dict.fromkeys(announce_maddr(t, self.port) for t in self.announce))

    @property
    def direct_announce_address(self) -> tuple[str, int] | None:
        """``direct_announce`` as (host, port), or None when not given."""
        if self.direct_announce is None:
            return None
        return split_host_port(self.direct_announce, "--direct-announce", self.direct_port, "--direct-port")


_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def _check_host(host: str, flag: str, text: str) -> str:
    """``host`` (an IP address or a DNS name) if others can dial it; ConfigError otherwise."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not host or len(host) > 253 or not set(host.lower()) <= _DNS_CHARS or host.startswith(("-", ".")):
            raise ConfigError(f"{flag} {text!r}: {host!r} is neither an IP address nor a DNS name") from None
        return host
    if ip.is_unspecified:
        raise ConfigError(f"{flag} {text!r}: {host} means every interface and cannot be dialled; give the address "
                          "others should dial")
    return str(ip)


def split_host_port(text: str, flag: str, default_port: int = 0, port_flag: str = "--port") -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``HOST`` (then ``default_port``, which must not be 0) -> (host, port);
    ConfigError naming ``flag`` otherwise."""
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"{flag} {text!r}: expected HOST:PORT or [IPV6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if port_text:
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: bad port {port_text!r}; expected HOST:PORT") from None
    else:
        port = default_port
    if not 0 < port <= 65535:
        raise ConfigError(f"{flag} {text!r}: needs a port in 1..65535 (HOST:PORT, or HOST with a fixed "
                          f"{port_flag})")
    return _check_host(host, flag, text), port


def announce_maddr(text: str, default_port: int = 0) -> str:
    """One ``--announce`` value as a libp2p multiaddr ``/ip4|ip6|dns|dns4|dns6/H/tcp/P``; ConfigError otherwise."""
    if text.startswith("/"):
        parts = text.split("/")
        if (len(parts) != 5 or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[3] != "tcp"
                or not parts[4].isdigit() or not 0 < int(parts[4]) <= 65535):
            raise ConfigError(f"--announce {text!r}: expected /ip4/HOST/tcp/PORT (a fixed port, no /p2p/ suffix)")
        host = _check_host(parts[2], "--announce", text)
        if parts[1].startswith("ip") and f"ip{ipaddress.ip_address(host).version}" != parts[1]:
            raise ConfigError(f"--announce {text!r}: {host} is not an {parts[1]} address")
        return f"/{parts[1]}/{host}/tcp/{int(parts[4])}"
    host, port = split_host_port(text, "--announce", default_port)
    try:
        kind = f"ip{ipaddress.ip_address(host).version}"
    except ValueError:
        kind = "dns"
    return f"/{kind}/{host}/tcp/{port}"
