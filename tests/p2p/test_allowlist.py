"""Private swarms by an owner-signed allow-list: the file, then real in-process peers (owner, member, outsider)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from meshinfer.cli.main import main as cli_main
from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError, RemoteError, TransportError
from meshinfer.p2p.allowlist import ALLOW_HEADER, load_allow_list, make_allow_line, parse_allow_line
from meshinfer.p2p.echo import ECHO_PROTOCOL, echo_handler
from meshinfer.p2p.identity import Identity, write_identity
from meshinfer.p2p.node import PeerNode
from meshinfer.wire.messages import Ping, Pong
from meshinfer.wire.records import SeedRecord

OWNER, MEMBER, OUTSIDER = (Identity.generate() for _ in range(3))


def test_allow_list_file(tmp_path: Path) -> None:
    line = make_allow_line(OWNER, [MEMBER.peer_id, MEMBER.peer_id])
    allow = parse_allow_line(line)
    assert allow.owner == OWNER.peer_id and allow.peers == {MEMBER.peer_id}
    assert allow.admits(OWNER.peer_id) and allow.admits(MEMBER.peer_id) and not allow.admits(OUTSIDER.peer_id)
    assert "has not listed peer" in allow.refusal(OUTSIDER.peer_id)
    forged = make_allow_line(OUTSIDER, [OUTSIDER.peer_id])  # a valid list of another owner: another swarm
    assert parse_allow_line(forged).owner == OUTSIDER.peer_id
    header, b64 = line.split()
    tampered = b64[:40] + ("A" if b64[40] != "A" else "B") + b64[41:]
    with pytest.raises(ConfigError, match="--swarm-allow"):
        parse_allow_line(f"{header} {tampered}")
    with pytest.raises(ConfigError, match="not an allow-list file"):
        parse_allow_line("meshinfer-swarm-key/1 AAAA")
    with pytest.raises(ConfigError, match="no such file"):
        load_allow_list(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not both"):
        P2PConfig(swarm_key="a", swarm_allow="b")
    owner_key = tmp_path / "owner.key"
    write_identity(OWNER, owner_key)
    out = tmp_path / "allow"
    assert cli_main(["swarm-key", "allow", "--identity", str(owner_key), MEMBER.peer_id, "--out", str(out)]) == 0
    assert out.read_text().startswith(ALLOW_HEADER)
    assert load_allow_list(out).owner == OWNER.peer_id and load_allow_list(out).admits(MEMBER.peer_id)
    assert cli_main(["swarm-key", "allow", "--identity", str(tmp_path / "none"), MEMBER.peer_id, "--out",
                     str(out)]) == 2


@pytest.mark.slow
def test_only_listed_peers_join_use_the_dht_and_open_streams(tmp_path: Path) -> None:
    allow_file = tmp_path / "allow"
    allow_file.write_text(make_allow_line(OWNER, [MEMBER.peer_id]) + "\n")
    stranger_file = tmp_path / "stranger-allow"  # signed by the owner, but not listing the outsider
    stranger_file.write_text(make_allow_line(OWNER, [MEMBER.peer_id]) + "\n")

    async def main() -> None:
        private = P2PConfig(mdns=False, swarm_allow=str(allow_file))
        owner = await PeerNode.start(private, identity=OWNER)
        await owner.handle(ECHO_PROTOCOL, echo_handler)
        peers = tuple(m if "/p2p/" in m else f"{m}/p2p/{owner.peer_id}" for m in owner.maddrs)
        member = outsider = None
        try:
            member = await PeerNode.start(P2PConfig(mdns=False, swarm_allow=str(allow_file), initial_peers=peers),
                                          identity=MEMBER)
            assert await member.ping(owner.peer_id, owner.maddrs) is not None  # DHT RPCs work between members
            record = SeedRecord(peer_id=MEMBER.peer_id, model_id="0" * 32, num_blocks=1, blocks=[], client_part=True,
                                files=True, addresses=[])
            assert await member.dht_put_record("seed:test", record, time.time() + 60)
            assert [f.peer_id for f in await owner.dht_get_records("seed:test")] == [MEMBER.peer_id]
            for direct in (owner.direct_addresses, ()):
                async with await member.open_stream(owner.peer_id, ECHO_PROTOCOL, maddrs=owner.maddrs,
                                                    direct=direct) as stream:
                    assert isinstance(await stream.request(Ping(seq=1, payload=b"hi"), timeout=10), Pong)
            with pytest.raises(ConfigError, match="join it with --swarm-allow FILE"):
                await PeerNode.start(P2PConfig(mdns=False, initial_peers=peers), identity=OUTSIDER)
            with pytest.raises(ConfigError, match=f"has not listed peer {OUTSIDER.peer_id}"):
                await PeerNode.start(P2PConfig(mdns=False, swarm_allow=str(stranger_file), initial_peers=peers),
                                     identity=OUTSIDER)
            outsider = await PeerNode.start(P2PConfig(mdns=False), identity=OUTSIDER)  # dials the owner directly
            assert await outsider.ping(owner.peer_id, owner.maddrs, timeout=10) is None  # no DHT answer
            assert outsider._direct is not None
            with pytest.raises(TransportError, match="has not listed peer"):
                await outsider._direct.dial(owner.peer_id, owner.direct_addresses[0], ECHO_PROTOCOL,
                                            settings=outsider.settings.stream, timeout=10)
            async with await outsider.open_stream(owner.peer_id, ECHO_PROTOCOL, maddrs=owner.maddrs) as stream:
                with pytest.raises(RemoteError, match="has not listed peer"):  # a typed Error, then closed
                    await stream.request(Ping(seq=1, payload=b"hi"), timeout=10)
        finally:
            for node in (outsider, member, owner):
                if node is not None:
                    await node.close()

    asyncio.run(main())
