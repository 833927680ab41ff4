"""Announced addresses and ``meshinfer doctor`` against real processes on 127.0.0.1.

A server started with ``--direct-announce 127.0.0.1:<forwarder port>`` must be reached on the direct plane through
that forwarder (a small TCP relay this test runs, counting the bytes it carries), and the client's tokens must equal
the local model's. ``meshinfer doctor --initial-peers <a local dht>`` prints its verdicts (the dht dials it back on
its direct address; not on an announced address where nobody listens) and exits 0; for an unreachable initial peer
it exits 1 with one clear ``[fail]`` line.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv, start_dht
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

PROMPT = "The keeper climbed the tower"


class Forwarder:
    """Accepts on 127.0.0.1 (a free port) and relays each connection to ``127.0.0.1:target``, counting bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.target = 0
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._closed = False
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.connections += 1
                self._open += [conn, upstream]
            threading.Thread(target=self._pipe, args=(conn, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, conn, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        with self._lock:
            for s in self._open:
                s.close()


@pytest.fixture
def forwarder() -> Iterator[Forwarder]:
    fwd = Forwarder()
    try:
        yield fwd
    finally:
        fwd.close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def test_a_direct_announce_address_is_what_clients_dial(forwarder: Forwarder) -> None:
    from meshinfer.models.engine import LocalModel

    model_dir = tiny_checkpoint("llama")
    reference = LocalModel.from_pretrained(model_dir)
    expected = reference.generate(reference.tokenizer(PROMPT)["input_ids"], 12)
    forwarder.target = free_port()
    args = ["--direct-port", str(forwarder.target), "--direct-announce", f"127.0.0.1:{forwarder.port}"]
    with LocalSwarm(model_dir, spans=[(0, 4)], server_args=args) as swarm:
        gen = subprocess.run(meshinfer_argv("generate", "--model", str(model_dir), "--initial-peers",
                                            *swarm.initial_peers, "--prompt", PROMPT, "--max-new-tokens", "12",
                                            "--json"), capture_output=True, text=True, timeout=180)
        assert gen.returncode == 0, gen.stderr
        assert json.loads(gen.stdout)["generated_token_ids"] == expected
    assert forwarder.connections >= 1
    # every step's hidden states went through the forwarder, in both directions (TLS: sizes, not contents)
    assert forwarder.bytes_up > 12 * 256 and forwarder.bytes_down > 12 * 256, vars(forwarder)


def test_doctor_checks_initial_peers() -> None:
    dht, maddrs = start_dht()
    with dht:
        ok = subprocess.run(meshinfer_argv("doctor", "--no-mdns", "--initial-peers", *maddrs),
                            capture_output=True, text=True, timeout=180)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        lines = ok.stdout.splitlines()
        assert any(line.startswith(f"[  ok] initial peer: {maddrs[0]} answered in ") for line in lines), lines
        assert any(line.startswith("[  ok] swarm: joined the DHT") for line in lines), lines
        assert any(line.startswith("[  ok] inbound: peer ") and "dialled this machine back" in line
                   for line in lines), lines
        closed = free_port()  # announced, nobody listens there: the dial-back must fail, and say so
        nat = subprocess.run(meshinfer_argv("doctor", "--no-mdns", "--initial-peers", maddrs[0], "--direct-port",
                                            str(free_port()), "--direct-announce", f"127.0.0.1:{closed}"),
                             capture_output=True, text=True, timeout=180)
        assert nat.returncode == 0, nat.stdout + nat.stderr
        assert f"[warn] inbound: peer {maddrs[0].rsplit('/p2p/', 1)[1][:16]}... could NOT dial this machine back at " \
               f"/ip4/127.0.0.1/tcp/{closed}/tls" in nat.stdout, nat.stdout
        js = subprocess.run(meshinfer_argv("doctor", "--no-mdns", "--json", "--initial-peers", maddrs[0]),
                            capture_output=True, text=True, timeout=180)
        assert js.returncode == 0, js.stderr
        doc = json.loads(js.stdout)
        assert doc["ok"] is True and doc["facts"]["initial_peers"][0]["rtt_s"] > 0
        peer_id = maddrs[0].rsplit("/p2p/", 1)[1]
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{peer_id}"
    bad = subprocess.run(meshinfer_argv("doctor", "--no-mdns", "--timeout", "5", "--initial-peers", dead),
                         capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    fails = [line for line in bad.stdout.splitlines() if line.startswith("[fail]")]
    assert fails and fails[0].startswith(f"[fail] initial peer: {dead} unreachable: "), bad.stdout
