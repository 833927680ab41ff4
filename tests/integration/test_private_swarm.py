"""A private swarm of real processes (one ``meshinfer dht`` + one server of a tiny llama, both with ``--swarm-key``):
members generate as before; an outsider (no key, another key) cannot join, read or write records, open a session or
fetch a piece, each a clear refusal; a member pointed at a public swarm is refused in one line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from meshinfer.cli.main import main as cli_main
from meshinfer.config import P2PConfig
from meshinfer.errors import ConfigError, TransportError
from meshinfer.p2p import SESSION_PROTOCOL, privateswarm
from meshinfer.p2p.membership import load_swarm_key
from meshinfer.p2p.node import PeerNode
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm, ServerProcess
from meshinfer.wire.messages import Error, Ping
from meshinfer.wire.pieces import PIECES_PROTOCOL, GetManifest, ManifestData, decode_piece_message, encode_piece_message
from meshinfer.wire.records import ServerRecord, encode_record

pytestmark = pytest.mark.slow

PROMPT = "The keeper climbed the tower"
TOKENS = 8
TIMEOUT = 120


class Private:
    def __init__(self, key: Path, other_key: Path, swarm: LocalSwarm) -> None:
        self.key, self.other_key, self.swarm = key, other_key, swarm

    @property
    def peers(self) -> list[str]:
        return list(self.swarm.initial_peers)

    @property
    def server(self) -> ServerProcess:
        return self.swarm.servers[0]


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Private]:
    tmp = tmp_path_factory.mktemp("private-swarm")
    key, other = tmp / "swarm.key", tmp / "other.key"
    assert cli_main(["swarm-key", "new", "--out", str(key)]) == 0
    assert cli_main(["swarm-key", "new", "--out", str(other)]) == 0
    dht = ManagedProcess(meshinfer_argv("dht", "--host", "127.0.0.1", "--stop-on-stdin-eof", "--swarm-key", str(key)),
                         name="meshinfer dht (private)")
    swarm: LocalSwarm | None = None
    try:
        maddrs = [dht.read_line(90)]
        while (line := dht.poll_line(0.3)) is not None:
            maddrs.append(line)
        swarm = LocalSwarm(tiny_checkpoint("llama"), spans=(), auto_servers=1,
                           initial_peers=[m for m in maddrs if m.startswith("/")],
                           server_args=["--swarm-key", str(key)]).start()
        yield Private(key, other, swarm)
    finally:
        try:
            if swarm is not None:
                swarm.stop()
        finally:
            dht.stop(timeout=10.0)


def meshinfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshinfer_argv(*args), capture_output=True, text=True, timeout=TIMEOUT, check=False)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- members --------------------------------------------------------------------------------------

def test_members_generate_as_before(private: Private) -> None:
    from meshinfer.models.engine import LocalModel

    proc = meshinfer("generate", "--model", str(tiny_checkpoint("llama")), "--prompt", PROMPT, "--json", "--no-mdns",
                     "--max-new-tokens", str(TOKENS), "--swarm-key", str(private.key),
                     "--initial-peers", *private.peers)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    local = LocalModel.from_pretrained(tiny_checkpoint("llama"))
    assert doc["generated_token_ids"] == local.generate(local.tokenizer(PROMPT)["input_ids"], TOKENS)


# --- outsiders: joining ---------------------------------------------------------------------------

def test_outsiders_cannot_join(private: Private) -> None:
    start = time.monotonic()
    one_line_error(meshinfer("swarm", "--no-mdns", "--initial-peers", *private.peers),
                   "this swarm is private: join it with --swarm-key FILE")
    one_line_error(meshinfer("generate", "--model", str(tiny_checkpoint("llama")), "--prompt", PROMPT, "--no-mdns",
                             "--swarm-key", str(private.other_key), "--initial-peers", *private.peers),
                   "this swarm is private: your --swarm-key is not its key")
    assert time.monotonic() - start < 2 * TIMEOUT  # refused, never left hanging


def test_a_member_pointed_at_a_public_swarm_is_refused(private: Private) -> None:
    async def main() -> None:
        public = await PeerNode.start(P2PConfig(mdns=False))
        try:
            with pytest.raises(ConfigError, match=r"this peer is in a public swarm \(no swarm key\): drop --swarm-key"):
                await PeerNode.start(P2PConfig(mdns=False, swarm_key=str(private.key),
                                               initial_peers=tuple(f"{m}/p2p/{public.peer_id}" if "/p2p/" not in m
                                                                   else m for m in public.maddrs)))
        finally:
            await public.close()

    asyncio.run(main())


# --- outsiders that skip the join check: records, sessions, pieces ----------------------------------

async def _member(private: Private) -> PeerNode:
    return await PeerNode.start(P2PConfig(mdns=False, swarm_key=str(private.key), initial_peers=tuple(private.peers)))


async def _no_check(*_args: object, **_kwargs: object) -> None:
    return None


def test_outsiders_get_no_dht_answers_and_no_records(private: Private, monkeypatch: pytest.MonkeyPatch) -> None:
    from hivemind.dht.routing import DHTID
    from hivemind.p2p import PeerID

    model_id = private.swarm.model_id
    key = load_swarm_key(private.key)
    dht_maddr = private.peers[0]
    dht_peer = dht_maddr.rsplit("/p2p/", 1)[1]

    async def main() -> None:
        member = await _member(private)
        monkeypatch.setattr(privateswarm, "check_join", _no_check)  # a modified client: skips the join check
        with pytest.raises(TransportError, match="no initial peer answered"):  # the DHT answers it nothing
            await PeerNode.start(P2PConfig(mdns=False, initial_peers=tuple(private.peers)))
        outsider = await PeerNode.start(P2PConfig(mdns=False))  # its own DHT, asking the swarm's DHT node directly
        try:
            found = await member.dht_get_records(f"servers:{model_id}")
            assert [f.peer_id for f in found] == [private.server.peer_id]  # members read as before
            assert await member.ping(dht_peer, [dht_maddr]) is not None
            assert await outsider.ping(dht_peer, [dht_maddr], timeout=10) is None
            pid, names = PeerID.from_base58(dht_peer), [f"servers:{model_id}", key.dht_key(f"servers:{model_id}")]
            protocol = outsider._dht.protocol
            assert await protocol.call_find(pid, [DHTID.generate(source=n) for n in names]) is None
            fake = msgspec.structs.replace(found[0].record, peer_id=outsider.peer_id)
            stored = await protocol.call_store(pid, [DHTID.generate(source=names[1])], [encode_record(fake)],
                                               time.time() + 60)
            assert stored is None  # nothing stored for an outsider
            again = await member.dht_get_records(f"servers:{model_id}")
            assert [f.peer_id for f in again] == [private.server.peer_id]
        finally:
            await outsider.close()
            await member.close()

    asyncio.run(main())


def test_outsiders_cannot_open_a_session_or_fetch_a_piece(private: Private) -> None:
    server, model_id = private.server, private.swarm.model_id

    async def main() -> None:
        member = await _member(private)
        outsider = await PeerNode.start(P2PConfig(mdns=False))  # knows the server's addresses, holds no key
        try:
            (record,) = await member.dht_get_records(f"servers:{model_id}")
            assert isinstance(record.record, ServerRecord) and record.record.direct_addresses
            direct = record.record.direct_addresses
            # a member fetches the manifest (direct plane) as before
            async with await member.open_stream(server.peer_id, PIECES_PROTOCOL, maddrs=server.maddrs,
                                                direct=direct) as stream:
                await stream.send_bytes(encode_piece_message(GetManifest(model_id=model_id)))
                assert isinstance(decode_piece_message(await stream.recv_bytes(timeout=30)), ManifestData)
            # the outsider: the direct plane refuses its hello; libp2p streams get a typed Error, then closed
            assert outsider._direct is not None
            with pytest.raises(TransportError, match="this swarm is private: join it with --swarm-key"):
                await outsider._direct.dial(server.peer_id, direct[0], SESSION_PROTOCOL,
                                            settings=outsider.settings.stream, timeout=10)
            for protocol in (SESSION_PROTOCOL, PIECES_PROTOCOL):
                async with await outsider.open_stream(server.peer_id, protocol, maddrs=server.maddrs) as stream:
                    if protocol == PIECES_PROTOCOL:
                        await stream.send_bytes(encode_piece_message(GetManifest(model_id=model_id)))
                    else:
                        await stream.send(Ping(seq=1, payload=b""))
                    reply = await stream.recv(timeout=30)
                assert isinstance(reply, Error), reply
                assert reply.message.startswith("this swarm is private: join it with --swarm-key"), reply.message
        finally:
            await outsider.close()
            await member.close()

    asyncio.run(main())
