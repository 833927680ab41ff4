"""A server behind NAT serves through a circuit relay: network namespaces, iptables masquerading, real processes.

Topology (``meshinfer.testing.netns``): a LAN standing for the internet with a bootstrap/relay peer (``meshinfer
dht``, a relay hop by default on a non-loopback address), a client and later a public server; a NATed host behind
its own router namespace (masquerading, only replies forwarded in): nobody outside can open a connection to it.
The NATed server joins through the relay, AutoRelay reserves a slot there, and it announces itself ``relayed``; its
direct plane (a private address) cannot be dialled, so the client falls back to libp2p through the relay and must
generate the local engine's exact tokens. A public server started next is preferred by the planner (the relayed-hop
penalty; the clients plan with ``--no-spread``, the cheapest route, since spreading still sends a relayed server a
small share of sessions). The added latency per token (relayed vs direct) is printed. Skips, naming the missing
feature, where namespaces or NAT cannot be made. Everything (namespaces, veths, processes) is removed at the end,
also on failure.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.netns import NetnsLan, nat_unavailable_reason
from meshinfer.testing.procs import meshinfer_argv, pid_alive

PROMPT = "The quick brown fox"
NEW_TOKENS = 24

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def nat_available() -> None:
    reason = nat_unavailable_reason()
    if reason is not None:
        pytest.skip(f"NATed namespace unavailable: {reason}")



def _servers(lan: NetnsLan, i: int, bootstrap: str) -> dict[str, dict[str, Any]]:
    done = lan.run(i, meshinfer_argv("swarm", "--json", "--timeout", "10", "--initial-peers", bootstrap),
                   timeout=120)
    assert done.returncode == 0, done.stderr
    return {s["peer_id"]: s for m in json.loads(done.stdout)["models"] for s in m["servers"]}


def _wait_reachability(lan: NetnsLan, i: int, bootstrap: str, peer_id: str, kind: str,
                       timeout: float) -> dict[str, Any]:
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        seen = _servers(lan, i, bootstrap)
        if seen.get(peer_id, {}).get("reachability") == kind and seen[peer_id]["state"] == "online":
            return seen[peer_id]
        time.sleep(3.0)
    raise AssertionError(f"{peer_id} not announced {kind} within {timeout:g}s: {seen.get(peer_id)}")


def _generate(lan: NetnsLan, i: int, ckpt: Path, bootstrap: str) -> dict[str, Any]:
    # --no-spread: the planner's single cheapest route. With spreading (the default) a relayed server is still
    # picked at odds (cost_public / cost_relayed) ** 2, about 1 in 100 here: by design, and a CI flake if asserted
    done = lan.run(i, meshinfer_argv("generate", "--model", str(ckpt), "--prompt", PROMPT, "--max-new-tokens",
                                     str(NEW_TOKENS), "--json", "--no-mdns", "--no-spread", "--initial-peers",
                                     bootstrap),
                   timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _per_token_s(doc: dict[str, Any]) -> float:
    return 1.0 / float(doc["timings"]["decode_tokens_per_s"])


def test_natted_server_serves_through_a_relay(nat_available: None) -> None:
    from meshinfer.models.engine import LocalModel

    ckpt = tiny_checkpoint("llama")
    blocks = int(json.loads((Path(ckpt) / "config.json").read_text())["num_hidden_layers"])
    local = LocalModel.from_pretrained(ckpt)
    # the "internet" LAN uses public-looking addresses (11.77/16, unused and isolated in the namespaces): libp2p's
    # AutoRelay announces only public relay addresses
    with NetnsLan(3, subnet=31, prefix="11.77") as lan:
        natted = lan.add_natted_host()
        # AutoNAT needs several peers to call the relay public (p2pd's relay manager serves only then): forced here
        relay = lan.popen(0, meshinfer_argv("dht", "--host", lan.addresses[0], "--port", "31337", "--no-mdns",
                                            "--nat", "public", "--stop-on-stdin-eof"), name="relay")
        bootstrap = relay.read_line(timeout=120.0)
        assert bootstrap is not None and bootstrap.startswith(f"/ip4/{lan.addresses[0]}/"), relay.stderr_tail()
        server = lan.popen(natted, meshinfer_argv("serve", "--model", str(ckpt), "--blocks", f"0:{blocks}",
                                                  "--host", lan.addresses[natted], "--no-mdns", "--nat", "private",
                                                  "--initial-peers", bootstrap, "--stop-on-stdin-eof"),
                           name="natted-server")
        nat_id = server.wait_ready(240.0)["peer_id"]

        # it reserved a slot on the relay and says so; its only libp2p way in is the circuit
        record = _wait_reachability(lan, 1, bootstrap, nat_id, "relayed", 240.0)
        assert any("/p2p-circuit" in a for a in record["addresses"]), record

        relayed = _generate(lan, 1, ckpt, bootstrap)
        assert [hop["peer_id"] for hop in relayed["route"]] == [nat_id], relayed
        assert relayed["generated_token_ids"] == local.generate(relayed["prompt_token_ids"], NEW_TOKENS)
        # did libp2p hole-punch (DCUtR) past the relay? the router then tracked a connection from the NATed server
        # to the client itself (informational: both are fine, the relay is what made the server reachable)
        tracked = subprocess.run(["ip", "netns", "exec", lan.routers[0], "cat", "/proc/net/nf_conntrack"],
                                 capture_output=True, text=True, check=False).stdout
        punched = any(f"dst={lan.addresses[1]} " in line and "tcp" in line for line in tracked.splitlines())
        assert any(f"dst={lan.addresses[0]} " in line for line in tracked.splitlines()), tracked  # the relay's

        # a public server of the same blocks: the planner prefers it over the relayed one
        public = lan.popen(2, meshinfer_argv("serve", "--model", str(ckpt), "--blocks", f"0:{blocks}", "--host",
                                             lan.addresses[2], "--no-mdns", "--initial-peers", bootstrap,
                                             "--stop-on-stdin-eof"), name="public-server")
        public_id = public.wait_ready(240.0)["peer_id"]
        _wait_reachability(lan, 1, bootstrap, public_id, "public", 120.0)
        direct = _generate(lan, 1, ckpt, bootstrap)
        assert [hop["peer_id"] for hop in direct["route"]] == [public_id], direct
        assert direct["generated_token_ids"] == relayed["generated_token_ids"]

        relayed_s, direct_s = _per_token_s(relayed), _per_token_s(direct)
        print(f"\nper token: relayed {relayed_s * 1e3:.2f} ms, direct {direct_s * 1e3:.2f} ms, "
              f"added by the relay {(relayed_s - direct_s) * 1e3:+.2f} ms ({NEW_TOKENS} tokens, tiny llama; "
              f"direct connection NATed server -> client seen by the router: {punched})")
        pids = [relay.pid, server.pid, public.pid]
    assert lan.remaining() == []
    assert not [p for p in pids if pid_alive(p)]


def test_nat_namespaces_are_removed_when_the_body_fails(nat_available: None) -> None:
    lan = NetnsLan(1, subnet=32)
    with pytest.raises(RuntimeError, match="boom"), lan:
        natted = lan.add_natted_host()
        proc = lan.popen(natted, ["sleep", "60"])
        raise RuntimeError("boom")
    assert lan.remaining() == []
    assert not pid_alive(proc.pid)
