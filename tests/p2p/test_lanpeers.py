"""The pure half of LAN discovery (``meshinfer.p2p.lanpeers``): TXT encoding, bounded decoding, what to join."""

from __future__ import annotations

import pytest

from meshinfer.p2p.lanpeers import (
    LanLimits,
    LanPeer,
    decode_txt,
    encode_txt,
    found_via,
    join_maddrs,
    lan_discovery_enabled,
    no_peers_message,
    own_maddrs,
    pick_join,
)

A = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
B = "QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ"
C = "QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb"


def peer(pid: str, *ips: str, role: str = "server", swarm: str = "") -> LanPeer:
    return LanPeer(pid, tuple(f"/ip4/{ip}/tcp/4001/p2p/{pid}" for ip in ips or ("10.77.0.1",)), role, swarm)


def as_bytes(props: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in props.items()}


def test_round_trip_through_txt_bytes() -> None:
    p = peer(A, "10.77.0.1", "192.168.1.5", role="dht", swarm="lab")
    assert decode_txt(as_bytes(encode_txt(p))) == p


def test_own_maddrs_appends_the_peer_id_dedups_and_bounds() -> None:
    got = own_maddrs(A, ["/ip4/10.0.0.1/tcp/1", f"/ip4/10.0.0.1/tcp/1/p2p/{A}", "/ip4/10.0.0.2/tcp/1"])
    assert got == (f"/ip4/10.0.0.1/tcp/1/p2p/{A}", f"/ip4/10.0.0.2/tcp/1/p2p/{A}")
    many = [f"/ip4/10.0.0.{i}/tcp/1" for i in range(20)]
    assert len(own_maddrs(A, many, LanLimits(max_maddrs=3))) == 3


@pytest.mark.parametrize("change", [
    {"v": "2"},                                   # unknown version
    {"id": ""},                                   # no peer id
    {"id": "x" * 200},                            # oversized peer id
    {"role": "king"},                             # unknown role
    {"swarm": "s" * 100},                         # oversized swarm name
    {"a0": f"/ip4/10.0.0.1/tcp/1/p2p/{B}"},       # an address of another peer
    {"a0": "not-a-multiaddr"},
    {"a0": "/" + "x" * 300 + f"/p2p/{A}"},        # oversized address
])
def test_malformed_advertisements_are_ignored(change: dict[str, str]) -> None:
    props = encode_txt(peer(A))
    props.update(change)
    assert decode_txt(as_bytes(props)) is None


def test_undecodable_bytes_and_no_address_are_ignored() -> None:
    props: dict[bytes, bytes | None] = as_bytes(encode_txt(peer(A)))
    props[b"id"] = b"\xff\xfe"
    assert decode_txt(props) is None
    bare = {k: v for k, v in encode_txt(peer(A)).items() if not k.startswith("a")}
    assert decode_txt(as_bytes(bare)) is None
    assert decode_txt({b"v": None}) is None


def test_pick_join_skips_self_clients_other_swarms_and_joined_peers() -> None:
    found = [peer(C), peer(A), peer(B, role="client"), peer("QmOther", swarm="private"), peer(A, "10.77.0.9")]
    picked = pick_join(found, own_peer_id=None)
    assert [p.peer_id for p in picked] == [A, C]           # sorted, one per peer id
    assert picked[0].maddrs == (f"/ip4/10.77.0.9/tcp/4001/p2p/{A}",)  # the latest advertisement wins
    assert [p.peer_id for p in pick_join(found, own_peer_id=A)] == [C]
    assert pick_join(found, own_peer_id=None, exclude=[A, C]) == []
    assert [p.peer_id for p in pick_join(found, own_peer_id=None, swarm="private")] == ["QmOther"]
    assert len(pick_join(found, own_peer_id=None, max_join=1)) == 1


def test_join_maddrs_keeps_order_without_duplicates() -> None:
    a, c = peer(A, "10.0.0.1", "10.0.0.2"), peer(C)
    assert join_maddrs([a, c, a]) == (*a.maddrs, *c.maddrs)


def test_found_via_and_the_no_peers_line() -> None:
    assert found_via(A, mdns=[A], bootstrap=[A]) == "mdns"
    assert found_via(B, mdns=[A], bootstrap=[B]) == "bootstrap"
    assert found_via(C, mdns=[A], bootstrap=[B]) == "dht"
    assert no_peers_message(3.0) == ("no meshinfer peers found on this LAN by mDNS within 3 s; pass --initial-peers "
                                     "MULTIADDR, or check that multicast reaches this machine")


def test_who_takes_part_in_lan_discovery() -> None:
    assert lan_discovery_enabled(mdns=True, host="10.77.0.1", client_mode=False)
    assert lan_discovery_enabled(mdns=True, host="0.0.0.0", client_mode=False)
    assert not lan_discovery_enabled(mdns=False, host="10.77.0.1", client_mode=False)   # --no-mdns
    assert not lan_discovery_enabled(mdns=True, host="10.77.0.1", client_mode=True)     # clients browse once
    assert not lan_discovery_enabled(mdns=True, host="127.0.0.1", client_mode=False)    # loopback: no LAN
    assert not lan_discovery_enabled(mdns=True, host="::1", client_mode=False)
    assert not lan_discovery_enabled(mdns=True, host="localhost", client_mode=False)    # not an IP: start_p2p says


def test_browse_time_is_validated() -> None:
    from meshinfer.config import P2PConfig
    from meshinfer.errors import ConfigError

    assert P2PConfig().mdns and P2PConfig().mdns_browse_s == 3.0
    for bad in (0.0, -1.0, 61.0, float("nan")):
        with pytest.raises(ConfigError, match="--mdns-browse-s"):
            P2PConfig(mdns_browse_s=bad)
