"""Helpers for dashboard tests: simulated servers as real signed DHT records, the browser, artifacts.

``FakeServers`` makes ``peers * models`` server records without running a model: ``peers`` real
``PeerNode``s (full DHT peers, in this process on one ``LoopThread``) each announce themselves as a server
of each of ``models`` made-up models, through the same ``p2p.announce.announcement`` a block server uses.
DHT records are owner-signed and a server record's subkey must be its writer's peer id, so one peer can be
one server per model, never more: 10 peers x 20 models gives 200 real, validated server records for the
price of 10 ``p2pd`` daemons (200 identities would need 200). Each peer also answers ``Ping`` on
``meshinfer/session/1`` (the echo handler), so the dashboard's round-trip measurements are real too.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshinfer.config import P2PConfig
from meshinfer.types import BlockRange

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def save_artifact(src: Path, name: str) -> Path:
    """Copy ``src`` to ``test-artifacts/<name>`` in the repository root (git-ignored); returns the copy."""
    ARTIFACTS.mkdir(exist_ok=True)
    dest = ARTIFACTS / name
    shutil.copyfile(src, dest)
    return dest


def fake_span(peer: int, model: int, num_blocks: int) -> BlockRange:
    """A deterministic span (2 to 4 blocks) for fake server ``peer`` of fake model ``model``."""
    length = min(num_blocks, 2 + (peer + model) % 3)
    start = (peer * 3 + model * 5) % (num_blocks - length + 1)
    return BlockRange(start, start + length)


def fake_state(peer: int, model: int) -> str:
    return "draining" if (peer + model) % 9 == 0 else "joining" if (peer + model) % 7 == 0 else "online"


@dataclass
class FakeServers:
    initial_peers: list[str]
    peers: int = 10
    models: int = 20
    num_blocks: int = 8
    ttl: float = 600.0
    nodes: list[Any] = field(default_factory=list)
    expected: dict[str, dict[str, str]] = field(default_factory=dict)
    """model id -> {peer id: span} as announced."""
    _runner: Any = None

    def model_id(self, m: int) -> str:
        return f"fa4e{m:02d}" + "0" * 26  # hex: a card's id has the form of a manifest id

    def start(self) -> FakeServers:
        from meshinfer.loopthread import LoopThread
        from meshinfer.p2p import SESSION_PROTOCOL, NodeSettings, PeerNode, echo_handler

        self._runner = LoopThread("fake-servers").start()
        config = P2PConfig(host="127.0.0.1", initial_peers=tuple(self.initial_peers))
        async def start_all() -> list[Any]:
            started = await asyncio.gather(*(PeerNode.start(config, NodeSettings()) for _ in range(self.peers)),
                                           return_exceptions=True)
            self.nodes = [n for n in started if not isinstance(n, BaseException)]  # stop() closes these
            failed = [n for n in started if isinstance(n, BaseException)]
            if failed:
                raise failed[0]
            return self.nodes

        try:
            self.nodes = self._runner.run(start_all(), 120)
            for node in self.nodes:
                self._runner.run(node.handle(SESSION_PROTOCOL, echo_handler), 30)
            for p, node in enumerate(self.nodes):
                ok = self._runner.run(node.dht_put_records(self._puts(p, node), time.time() + self.ttl,
                                                           timeout=60), 90)
                assert all(ok), f"fake peer {p}: {ok.count(False)} of {len(ok)} records not stored"
        except BaseException:
            self.stop()
            raise
        return self

    def _puts(self, p: int, node: Any) -> list[Any]:
        from meshinfer.p2p.announce import announcement
        from meshinfer.wire.records import ModelCard, ServerRecord

        puts = []
        for m in range(self.models):
            card = ModelCard(model_id=self.model_id(m), name=f"fake/model-{m:02d}", family="llama",
                             num_blocks=self.num_blocks, hidden_size=64, dtype="float32")
            span = fake_span(p, m, self.num_blocks)
            record = ServerRecord(peer_id=node.peer_id, model_id=card.model_id, span=span, state=fake_state(p, m),
                                  throughput=10.0 + 3 * p + m, cache_tokens_left=1000 * (p + 1),
                                  addresses=node.maddrs[:16], direct_addresses=node.direct_addresses[:8],
                                  software_version="0.1.0", public_name=f"fake-{p:02d}", sessions=p % 3)
            self.expected.setdefault(card.model_id, {})[node.peer_id] = str(span)
            puts += announcement(card, record)
        return puts

    def block_servers(self, model_id: str) -> list[int]:
        """How many fake servers hold each block of ``model_id``."""
        counts = [0] * self.num_blocks
        for span in self.expected[model_id].values():
            for i in BlockRange.parse(span).blocks():
                counts[i] += 1
        return counts

    def stop(self) -> None:
        if self._runner is None:
            return
        for node in self.nodes:
            try:
                self._runner.run(node.close(), 30)
            except Exception:
                pass
        self._runner.stop()
        self._runner = None
