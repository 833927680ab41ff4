"""The pure half of reachability (``meshinfer.p2p.reachability``) and the announce flags of ``P2PConfig``."""

from __future__ import annotations

import pytest

from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError
from meshinfer.p2p.reachability import (
    DoctorFacts,
    Interface,
    PeerCheck,
    announced_direct,
    classify,
    exit_code,
    verdicts,
    visible_hosts,
)

LAN = (Interface("lo", "127.0.0.1"), Interface("eth0", "192.168.1.20", multicast=True),
       Interface("eth0", "fe80::1", multicast=True))
PEER = "/ip4/192.168.1.5/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.mark.parametrize(("host", "kind"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("localhost", "loopback"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("10.1.2.3", "private"), ("192.168.0.7", "private"), ("fd00::2", "private"),
    ("100.64.1.1", "private"), ("169.254.3.4", "link-local"), ("fe80::1%eth0", "link-local"),
    ("8.8.8.8", "public"), ("2606:4700::1111", "public"), ("example.org", "name"),
])
def test_classify(host: str, kind: str) -> None:
    assert classify(host) == kind


def test_a_wildcard_bind_is_never_announced_as_such() -> None:
    maddrs = ["/ip4/127.0.0.1/tcp/5/p2p/Qm", "/ip4/192.168.1.20/tcp/5/p2p/Qm", "/ip4/192.168.1.20/tcp/5"]
    assert visible_hosts("0.0.0.0", maddrs) == ["127.0.0.1", "192.168.1.20"]
    assert visible_hosts("10.0.0.1", maddrs) == ["10.0.0.1"]
    assert announced_direct(None, "0.0.0.0", maddrs, 7, 8) == [
        "/ip4/127.0.0.1/tcp/7", "/ip4/127.0.0.1/tcp/8/tls", "/ip4/192.168.1.20/tcp/8/tls"]


def test_a_direct_announce_is_the_only_direct_address() -> None:
    assert announced_direct(("203.0.113.9", 443), "0.0.0.0", ["/ip4/10.0.0.1/tcp/5"], 7, 8) == [
        "/ip4/203.0.113.9/tcp/443/tls"]
    assert announced_direct(("node.example.org", 9000), "127.0.0.1", [], 7, 8) == [
        "/dns/node.example.org/tcp/9000/tls"]


def test_announce_flags_parse_to_multiaddrs() -> None:
    c = P2PConfig(port=4001, direct_port=4002, announce=("203.0.113.9", "198.51.100.1:5000", "/dns4/x.org/tcp/7",
                                                         "[2001:db8::1]:6000", "198.51.100.1:5000"),
                  direct_announce="203.0.113.9")
    assert c.announce_maddrs == ("/ip4/203.0.113.9/tcp/4001", "/ip4/198.51.100.1/tcp/5000", "/dns4/x.org/tcp/7",
                                 "/ip6/2001:db8::1/tcp/6000")
    assert c.direct_announce_address == ("203.0.113.9", 4002)
    assert P2PConfig().announce_maddrs == () and P2PConfig().direct_announce_address is None


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"announce": ("0.0.0.0:4001",)}, "--announce '0.0.0.0:4001': 0.0.0.0 means every interface"),
    ({"announce": ("203.0.113.9",)}, "--announce '203.0.113.9': needs a port"),
    ({"announce": ("/ip4/1.2.3.4/tcp/0",)}, "expected /ip4/HOST/tcp/PORT"),
    ({"announce": ("/ip4/1.2.3.4/tcp/5/p2p/QmX",)}, "no /p2p/ suffix"),
    ({"announce": ("/ip6/1.2.3.4/tcp/5",)}, "not an ip6 address"),
    ({"announce": ("h:70000",)}, "needs a port in 1..65535"),
    ({"direct_announce": "bad host:1"}, "--direct-announce 'bad host:1': 'bad host' is neither"),
    ({"direct_announce": "[::]:9"}, "means every interface"),
    ({"direct_announce": "h:x"}, "bad port 'x'"),
    ({"direct_announce": "10.0.0.1"}, "--direct-announce '10.0.0.1': needs a port"),
    ({"direct_announce": "10.0.0.1:5", "direct": False}, "--direct-announce needs the direct plane"),
])
def test_bad_announce_values_are_one_line_config_errors(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        P2PConfig(**kwargs)  # type: ignore[arg-type]
    assert needle in str(err.value) and "\n" not in str(err.value)


def lines(facts: DoctorFacts) -> list[str]:
    return [v.line() for v in verdicts(facts)]


def test_loopback_bind_warns_and_inbound_is_never_claimed() -> None:
    out = lines(DoctorFacts(interfaces=LAN, host="127.0.0.1", port=0))
    assert "[info] interface: eth0 192.168.1.20: private (up, multicast)" in out
    assert any(v.startswith("[warn] bind: 127.0.0.1") and "only processes on this machine" in v for v in out)
    assert any(v.startswith("[info] inbound: not checked") for v in out)
    assert any("mdns: usable on eth0, but a server bound to loopback" in v for v in out)


def test_wildcard_bind_behind_nat_says_how_to_be_reached() -> None:
    out = lines(DoctorFacts(interfaces=LAN, host="0.0.0.0", port=4001))
    assert any(v.startswith("[  ok] bind: 0.0.0.0 port 4001 (every interface): announced as 192.168.1.20 ")
               for v in out)
    assert any(v.startswith("[warn] announce: no public address") and "--announce PUBLIC_IP:P" in v for v in out)
    out = lines(DoctorFacts(interfaces=LAN, host="0.0.0.0", port=4001, announce=("/ip4/93.184.216.34/tcp/4001",)))
    assert any("announced as /ip4/93.184.216.34/tcp/4001 (public)" in v for v in out)
    assert any(v.startswith("[warn] direct: --announce without --direct-announce") for v in out)


@pytest.mark.parametrize(("interfaces", "zeroconf", "mdns", "needle"), [
    (LAN, True, True, "[  ok] mdns: usable on eth0"),
    (LAN, False, True, "[warn] mdns: unusable: the zeroconf package"),
    ((Interface("lo", "127.0.0.1"), Interface("eth0", "10.0.0.2", multicast=False)), True, True,
     "[warn] mdns: unusable: no up, multicast-capable"),
    (LAN, True, False, "[info] mdns: off (--no-mdns)"),
])
def test_mdns_verdict(interfaces: tuple[Interface, ...], zeroconf: bool, mdns: bool, needle: str) -> None:
    out = lines(DoctorFacts(interfaces=interfaces, host="0.0.0.0", port=0, zeroconf=zeroconf, mdns=mdns))
    assert any(v.startswith(needle) for v in out), out


def test_initial_peers_decide_the_exit_code() -> None:
    ok = verdicts(DoctorFacts(interfaces=LAN, host="0.0.0.0", port=0, initial_peers=(PeerCheck(PEER, 0.0042),),
                              joined=True))
    assert exit_code(ok) == 0
    assert f"[  ok] initial peer: {PEER} answered in 4.2 ms" in [v.line() for v in ok]
    bad = verdicts(DoctorFacts(interfaces=LAN, host="0.0.0.0", port=0, joined=False, join_error="no answer",
                               initial_peers=(PeerCheck(PEER, None, "refused"),)))
    assert exit_code(bad) == 1
    assert any(v.line().startswith(f"[fail] initial peer: {PEER} unreachable: refused") for v in bad)
    assert exit_code(verdicts(DoctorFacts(interfaces=LAN, host="127.0.0.1", port=0))) == 0


def test_mdns_browse_result_is_reported() -> None:
    out = lines(DoctorFacts(interfaces=LAN, host="0.0.0.0", port=0, mdns_found=2))
    assert "[  ok] mdns: usable on eth0; found 2 meshinfer peer(s) on this LAN" in out


def test_which_lan_peers_found_later_are_joined() -> None:
    from meshinfer.p2p.lanjoin import should_join
    from meshinfer.p2p.lanpeers import LanPeer

    me, other = "QmMe", "QmOther"
    assert should_join(LanPeer(other, (), "server"), own_peer_id=me, swarm="")
    assert should_join(LanPeer(other, (), "dht"), own_peer_id=me, swarm="")
    assert not should_join(LanPeer(me, (), "server"), own_peer_id=me, swarm="")
    assert not should_join(LanPeer(other, (), "client"), own_peer_id=me, swarm="")
    assert not should_join(LanPeer(other, (), "server", swarm="private"), own_peer_id=me, swarm="")


def test_inbound_verdict_says_what_the_dial_back_found() -> None:
    base = DoctorFacts(interfaces=LAN, host="0.0.0.0", port=0, joined=True,
                       initial_peers=(PeerCheck(PEER, 0.001),))
    addrs = ("/ip4/192.168.1.20/tcp/4002/tls",)
    import dataclasses

    ok = lines(dataclasses.replace(base, dialback_peer="QmYyQSo1c1Ym7orWxLYv", dialback_addresses=addrs,
                                   dialback_reached=True))
    assert any(v.startswith("[  ok] inbound: peer QmYyQSo1c1Ym7orW... dialled this machine back on the direct plane "
                            "at /ip4/192.168.1.20/tcp/4002/tls") for v in ok)
    no = verdicts(dataclasses.replace(base, dialback_peer="QmYyQSo1c1Ym7orWxLYv", dialback_addresses=addrs,
                                      dialback_reached=False))
    assert any(v.line().startswith("[warn] inbound: peer QmYyQSo1c1Ym7orW... could NOT dial") for v in no)
    assert exit_code(no) == 0  # clients fall back to libp2p: a warning, not a failure
    old = lines(dataclasses.replace(base, dialback_peer="Qm", dialback_note="the peer did not answer; it may be older"))
    assert any(v.startswith("[info] inbound: not checked: the peer did not answer; it may be older") for v in old)


def test_dial_back_requests_are_bounded() -> None:
    from meshinfer.p2p import dialback as db

    tls = "/ip4/192.168.1.20/tcp/4002/tls"
    assert db.decode_addresses(db.encode_addresses([tls])) == [tls]
    for bad in ([], [tls] * (db.MAX_ADDRESSES + 1), ["/ip4/10.0.0.1/tcp/5"], ["/ip4/1.2.3.4/tcp/5/tls" + "x" * 300]):
        with pytest.raises(ConfigError):
            db.decode_addresses(db.encode_addresses(bad))
    with pytest.raises(ConfigError):
        db.decode_addresses(b"\xc1garbage")
    now = [0.0]
    service = db.DialBackService(plane=None, clock=lambda: now[0])  # type: ignore[arg-type] - _admit only
    assert service._admit("QmA") is None
    assert "one dial-back per" in (service._admit("QmA") or "")
    for i in range(db.MAX_PER_MINUTE - 1):
        assert service._admit(f"QmB{i}") is None
    assert "in the last minute" in (service._admit("QmC") or "")
    now[0] = 61.0
    assert service._admit("QmC") is None and service._admit("QmA") is None
