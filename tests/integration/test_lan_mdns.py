"""Zero-config LAN: servers and a client in network namespaces on one bridge find each other by mDNS.

Three namespaces (``meshinfer.testing.netns.NetnsLan``): two servers of a tiny checkpoint's two halves, each bound
to its namespace's address and started at the same moment with no --initial-peers (each starts alone, then they
find each other by mDNS and merge into one swarm), and a client that has no bootstrap address. Skips, naming the
missing feature, where namespaces cannot be made (no ``ip``, not root, no netns/veth/bridge support).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.netns import NetnsLan, unavailable_reason
from meshinfer.testing.procs import meshinfer_argv, pid_alive

PROMPT = "The quick brown fox"
NEW_TOKENS = 10

pytestmark = pytest.mark.slow

JOIN_SCRIPT = """
import asyncio, json, sys
from meshinfer.client.swarm import ModelRef, SwarmView

async def main():
    view = await SwarmView.join([])
    try:
        cov = await view.coverage(ModelRef(sys.argv[1], int(sys.argv[2])))
        print(json.dumps(sorted(cov.servers)))
    finally:
        await view.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def lan_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"namespaced LAN unavailable: {reason}")



def _server_ids(lan: NetnsLan, i: int, *flags: str) -> dict[str, str]:
    """Peer id -> how ``meshinfer swarm`` (run in host ``i``) found each server it lists."""
    done = lan.run(i, meshinfer_argv("swarm", "--json", "--timeout", "10", *flags), timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    return {s["peer_id"]: s.get("found", "") for m in doc["models"] for s in m["servers"]}


def test_client_finds_lan_servers_by_mdns_and_generates_like_local(lan_available: None) -> None:
    from meshinfer.models.engine import LocalModel

    ckpt = tiny_checkpoint("llama")
    blocks = int(json.loads((Path(ckpt) / "config.json").read_text())["num_hidden_layers"])
    half = blocks // 2
    with NetnsLan(3) as lan:
        servers = [
            lan.popen(i, meshinfer_argv("serve", "--model", str(ckpt), "--blocks", span, "--host", lan.addresses[i],
                                        "--stop-on-stdin-eof"), name=f"server{i}")
            for i, span in ((0, f"0:{half}"), (1, f"{half}:{blocks}"))
        ]
        infos = [s.wait_ready(180.0) for s in servers]
        ids = {info["peer_id"] for info in infos}

        # The two servers, started together with no --initial-peers, ended up in ONE swarm: a reader joining
        # through server 0 alone (mDNS off) sees server 1 too. Records can take a moment to spread: retry.
        seen: dict[str, str] = {}
        for _ in range(20):
            seen = _server_ids(lan, 2, "--no-mdns", "--initial-peers", infos[0]["maddrs"][0])
            if ids <= set(seen):
                break
            time.sleep(2.0)
        assert ids <= set(seen), seen
        assert {seen[p] for p in ids} == {"bootstrap", "dht"}

        # `meshinfer swarm` with no address finds both by mDNS and says so.
        found = _server_ids(lan, 2)
        # each found by mDNS (a server whose answer came after the browse's grace is found through the DHT instead)
        assert ids <= set(found) and "mdns" in {found[p] for p in ids} <= {"mdns", "dht"}, found

        # The client, with no bootstrap address, generates through the LAN swarm: same tokens as local.
        done = lan.run(2, meshinfer_argv("generate", "--model", str(ckpt), "--prompt", PROMPT, "--max-new-tokens",
                                         str(NEW_TOKENS), "--json"), timeout=300)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert {hop["peer_id"] for hop in doc.get("route", [])} == ids, doc
        local = LocalModel.from_pretrained(ckpt)
        assert doc["generated_token_ids"] == local.generate(doc["prompt_token_ids"], NEW_TOKENS)
        assert "found 2 meshinfer peer(s) on this LAN by mDNS" in done.stderr

        # The Python API: SwarmView.join with no initial peers joins through the LAN too.
        done = lan.run(2, [sys.executable, "-c", JOIN_SCRIPT, infos[0]["model_id"], str(blocks)], timeout=120)
        assert done.returncode == 0, done.stderr
        assert set(json.loads(done.stdout.strip().splitlines()[-1])) == ids

        # --no-mdns: today's behaviour, a client with no address fails with one clear line.
        done = lan.run(2, meshinfer_argv("swarm", "--no-mdns"), timeout=60)
        assert done.returncode == 2 and done.stderr.startswith("error: --initial-peers is required"), done.stderr
        done = lan.run(2, meshinfer_argv("generate", "--model", infos[0]["model_id"], "--prompt", "x", "--no-mdns"),
                       timeout=60)
        assert done.returncode == 2 and "give --initial-peers" in done.stderr, done.stderr
        pids = [s.pid for s in servers]
    assert lan.remaining() == []
    assert not [p for p in pids if pid_alive(p)]


def test_a_lonely_client_says_no_peers_found(lan_available: None) -> None:
    with NetnsLan(1) as lan:
        start = time.monotonic()
        done = lan.run(0, meshinfer_argv("swarm", "--mdns-browse-s", "1.5"), timeout=60)
        took = time.monotonic() - start
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert lines == ["error: no meshinfer peers found on this LAN by mDNS within 1.5 s; pass --initial-peers "
                         "MULTIADDR, or check that multicast reaches this machine"], done.stderr
        assert took < 60  # not a hang
    assert lan.remaining() == []


def test_namespaces_are_removed_when_the_body_fails(lan_available: None) -> None:
    lan = NetnsLan(2)
    with pytest.raises(RuntimeError, match="boom"), lan:
        proc = lan.popen(0, ["sleep", "60"])
        raise RuntimeError("boom")
    assert lan.remaining() == []
    assert not pid_alive(proc.pid)


def test_no_mdns_neither_advertises_nor_browses(lan_available: None) -> None:
    with NetnsLan(2) as lan:
        hidden = lan.popen(0, meshinfer_argv("dht", "--host", lan.addresses[0], "--no-mdns", "--stop-on-stdin-eof"))
        hidden.read_line(timeout=120.0)  # its first multiaddr: it is up
        done = lan.run(1, meshinfer_argv("swarm", "--mdns-browse-s", "2"), timeout=60)
        assert done.returncode == 2 and "no meshinfer peers found on this LAN" in done.stderr, done.stderr
        hidden.stop()
        shown = lan.popen(0, meshinfer_argv("dht", "--host", lan.addresses[0], "--stop-on-stdin-eof"))
        shown.read_line(timeout=120.0)
        done = lan.run(1, meshinfer_argv("swarm", "--json", "--timeout", "5"), timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"models": [], "complete": True}
    assert lan.remaining() == []
