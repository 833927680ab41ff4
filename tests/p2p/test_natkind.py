"""NAT traversal decisions (``meshinfer.p2p.natkind``) and what they change: relay options, reachability, the route
planner's relayed-hop penalty, the direct-plane fallback memo, the ``--relay``/``--relay-hop`` flags."""

from __future__ import annotations

import argparse

import pytest

from meshinfer.cli.common import add_config_flags, config_from_args
from meshinfer.client.routing import plan_route
from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError
from meshinfer.p2p.natkind import (
    RELAYED_HOP_PENALTY_S,
    DirectFailures,
    RelayOptions,
    reachability,
    relay_options,
    relayed_hop_penalty_s,
)
from meshinfer.types import BlockRange
from meshinfer.wire.records import ServerRecord

RELAY = "/ip4/203.0.113.7/tcp/4001/p2p/QmRelay/p2p-circuit/p2p/QmMe"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # a server on a LAN or public address: relays used, AutoRelay on (it may be behind NAT), relays for others
        ({"client_mode": False, "loopback": False, "announced": False}, RelayOptions(True, True, True)),
        # a test server on 127.0.0.1: no AutoNAT, never a relay hop
        ({"client_mode": False, "loopback": True, "announced": False}, RelayOptions(True, False, False)),
        # announced addresses make a loopback-bound peer (behind a forwarder) a hop by default
        ({"client_mode": False, "loopback": True, "announced": True}, RelayOptions(True, False, True)),
        # clients dial through relays but neither reserve a slot nor relay
        ({"client_mode": True, "loopback": False, "announced": True}, RelayOptions(True, False, False)),
    ],
)
def test_relay_defaults(kwargs: dict[str, bool], expected: RelayOptions) -> None:
    assert relay_options(relay=True, relay_hop=None, **kwargs) == expected


def test_relay_flags_override_defaults() -> None:
    off = relay_options(relay=True, relay_hop=False, client_mode=False, loopback=False, announced=True)
    assert off.relay_hop is False
    assert relay_options(relay=True, relay_hop=True, client_mode=True, loopback=True, announced=False).relay_hop
    assert relay_options(relay=False, relay_hop=None, client_mode=False, loopback=False,
                         announced=True) == RelayOptions(False, False, False)


@pytest.mark.parametrize(
    ("maddrs", "confirmed", "expected"),
    [
        (["/ip4/1.2.3.4/tcp/31337/p2p/QmMe"], False, "public"),
        (["/ip4/10.0.0.2/tcp/31337/p2p/QmMe"], False, "public"),  # a LAN peer: reachable on its LAN
        ([], False, "public"),
        # behind NAT: its private address and a relayed one
        (["/ip4/10.0.0.2/tcp/31337/p2p/QmMe", RELAY], False, "relayed"),
        ([RELAY], False, "relayed"),
        ([RELAY], True, "hole-punched"),
        # a public address beside a relayed one: dialled directly
        (["/ip4/1.2.3.4/tcp/31337/p2p/QmMe", RELAY], False, "public"),
    ],
)
def test_reachability(maddrs: list[str], confirmed: bool, expected: str) -> None:
    assert reachability(maddrs, direct_confirmed=confirmed) == expected


def test_penalty_per_kind() -> None:
    assert relayed_hop_penalty_s("public") == relayed_hop_penalty_s("hole-punched") == 0.0
    assert relayed_hop_penalty_s("relayed") == relayed_hop_penalty_s("carrier-pigeon") == RELAYED_HOP_PENALTY_S


def server(peer: str, start: int, end: int, reach: str = "public") -> ServerRecord:
    return ServerRecord(peer_id=peer, model_id="m", span=BlockRange(start, end), state="online", throughput=100.0,
                        cache_tokens_left=1000, addresses=[], software_version="test", reachability=reach)


def test_planner_avoids_a_relayed_hop_when_a_direct_route_exists() -> None:
    # without the penalty one full server beats a two-hop chain (one round trip fewer)
    assert [h.peer_id for h in plan_route([server("A", 0, 12), server("B", 0, 6), server("C", 6, 12)],
                                          BlockRange(0, 12))] == ["A"]
    route = plan_route([server("A", 0, 12, "relayed"), server("B", 0, 6), server("C", 6, 12)], BlockRange(0, 12))
    assert [h.peer_id for h in route] == ["B", "C"]
    # a relayed server is still used when nothing else covers its blocks
    route = plan_route([server("A", 0, 6, "relayed"), server("C", 6, 12)], BlockRange(0, 12))
    assert [h.peer_id for h in route] == ["A", "C"]
    # what the client measured replaces the guess: a measured relayed server pays no extra
    route = plan_route([server("A", 0, 12, "relayed"), server("B", 0, 6), server("C", 6, 12)], BlockRange(0, 12),
                       measured={"A": 0.0001})
    assert [h.peer_id for h in route] == ["A"]


def test_direct_failures_skip_the_direct_plane_then_retry() -> None:
    memo = DirectFailures(retry_s=60.0, max_peers=2)
    assert memo.should_try_direct("A", 0.0)
    assert memo.note_failure("A", 0.0) is True  # news: log it
    assert not memo.should_try_direct("A", 30.0)
    assert memo.note_failure("A", 30.0) is False  # a second failure within retry_s: quiet
    assert not memo.should_try_direct("A", 89.0)
    assert memo.should_try_direct("A", 90.0)  # retry after 60 s since the last failure
    assert memo.note_failure("A", 95.0) is True
    memo.note_success("A")
    assert memo.should_try_direct("A", 96.0)
    for i, peer in enumerate("BCD"):  # bounded: the oldest is forgotten
        memo.note_failure(peer, 100.0 + i)
    assert memo.should_try_direct("B", 103.0) and not memo.should_try_direct("D", 103.0)


def parse(*argv: str) -> P2PConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, P2PConfig)
    return config_from_args(P2PConfig, parser.parse_args(list(argv)))


def test_relay_flags() -> None:
    assert (parse().relay, parse().relay_hop) == (True, None)
    assert parse("--no-relay").relay is False
    assert parse("--relay-hop").relay_hop is True
    assert parse("--no-relay-hop").relay_hop is False
    with pytest.raises(ConfigError, match="--relay-hop needs relays: drop --no-relay"):
        parse("--no-relay", "--relay-hop")


def _daemon_argv(config: P2PConfig) -> list[str]:
    """The p2pd command line a node started with ``config`` runs."""
    import asyncio
    from pathlib import Path

    from meshinfer.p2p.node import PeerNode

    async def main() -> list[str]:
        node = await PeerNode.start(config)
        try:
            assert node.daemon_pid is not None
            return Path(f"/proc/{node.daemon_pid}/cmdline").read_bytes().decode().split("\0")
        finally:
            await node.close()

    return asyncio.run(main())


@pytest.mark.slow
def test_the_daemon_gets_the_relay_flags() -> None:
    argv = _daemon_argv(P2PConfig(mdns=False))  # 127.0.0.1: no relay hop, no AutoRelay
    assert "-relay=1" in argv and "-autoRelay=0" in argv and "-relayService=0" in argv
    argv = _daemon_argv(P2PConfig(mdns=False, relay_hop=True, nat="public"))
    assert "-relayService=0" not in argv and "-forceReachabilityPublic=1" in argv
    argv = _daemon_argv(P2PConfig(mdns=False, relay=False))
    assert "-relay=0" in argv and "-relayService=0" in argv
