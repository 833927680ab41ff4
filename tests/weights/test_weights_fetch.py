"""Fetching from real ``meshinfer seed`` processes on 127.0.0.1: spread, verified, banned, resumed, bounded.

A bootstrap ``meshinfer dht`` and two seeders of the tiny Llama run for the whole module; a third seeder
started with the hidden test fault injector ``--corrupt-pieces`` runs for one test. The fetching node lives
in this process (on a ``LoopThread``). Every process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from weights_helpers import span_output

from meshinfer.config import P2PConfig
from meshinfer.errors import CheckpointError, ConfigError, UsageError
from meshinfer.loopthread import LoopThread
from meshinfer.models.checkpoint import Checkpoint, load_tokenizer
from meshinfer.models.fingerprint import checkpoint_fingerprint, manifest_tensors
from meshinfer.p2p.node import NodeSettings, PeerNode
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, start_dht
from meshinfer.types import BlockRange
from meshinfer.weights.fetch import FetchProgress, FetchResult, ensure_local, fetch
from meshinfer.weights.manifest import Manifest, PieceRef, Want
from meshinfer.weights.plan import PeerBans
from meshinfer.weights.store import PARTIAL_SUFFIX, ModelStore, group_filename
from meshinfer.wire.pieces import (
    PIECES_PROTOCOL,
    GetManifest,
    GetPiece,
    ManifestData,
    PieceData,
    PieceError,
    decode_piece_message,
    encode_piece_message,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@dataclass
class Swarm:
    maddrs: list[str]
    model_id: str
    seeders: list[dict[str, Any]]
    procs: list[ManagedProcess]

    def ids(self) -> list[str]:
        return [s["peer_id"] for s in self.seeders]


def start_seeders(directory: Path, maddrs: list[str], n: int, *extra: str) -> list[ManagedProcess]:
    return [ManagedProcess(meshinfer_argv("seed", str(directory), "--initial-peers", *maddrs,
                                          "--stop-on-stdin-eof", *extra), name="meshinfer seed") for _ in range(n)]


@pytest.fixture(scope="module")
def swarm(llama: Path) -> Iterator[Swarm]:
    model_id = checkpoint_fingerprint(llama)  # hashed once here; the seeders find it in the shared cache
    dht, maddrs = start_dht(timeout=90)
    procs = start_seeders(llama, maddrs, 2)
    try:
        infos = [p.read_json(timeout=120) for p in procs]
        assert all(model_id in info["models"] for info in infos)
        yield Swarm(maddrs, model_id, infos, procs)
    finally:
        for p in procs:
            p.stop()
        dht.stop()


@pytest.fixture(scope="module")
def client(swarm: Swarm) -> Iterator[tuple[LoopThread, PeerNode]]:
    runner = LoopThread("weights-test").start()
    node = runner.run(PeerNode.start(P2PConfig(initial_peers=tuple(swarm.maddrs)),
                                     NodeSettings(client_mode=True)), timeout=60)
    try:
        yield runner, node
    finally:
        runner.run(node.close(), timeout=30)
        runner.stop()


def same_tensors(a: Path, b: Path, names: list[str]) -> bool:
    ta, tb = Checkpoint(a).read(names), Checkpoint(b).read(names)
    return all(torch.equal(ta[n], tb[n]) for n in names)


def test_ensure_local_fetches_a_span_from_both_seeders(client, swarm: Swarm, llama: Path, tmp_path: Path) -> None:
    runner, node = client
    reports: list[FetchProgress] = []
    path = runner.run(ensure_local(node, swarm.model_id, blocks=BlockRange(1, 3), client_part=False,
                                   cache_dir=tmp_path, progress=reports.append), timeout=60)
    by_peer = Counter(r.peer for r in reports if r.peer is not None)
    assert set(by_peer) == set(swarm.ids()) and min(by_peer.values()) >= 3, by_peer
    last = reports[-1]
    assert last.done_pieces == last.total_pieces == sum(by_peer.values()) and last.done_bytes == last.total_bytes
    assert checkpoint_fingerprint(path) == swarm.model_id
    assert torch.equal(span_output(path, BlockRange(1, 3)), span_output(llama, BlockRange(1, 3)))
    with pytest.raises(CheckpointError):
        Checkpoint(path).load_head()  # not asked for
    reports.clear()
    again = runner.run(ensure_local(node, swarm.model_id, blocks=BlockRange(2, 3), client_part=False,
                                    cache_dir=tmp_path, progress=reports.append), timeout=60)
    assert again == path and reports == []  # already there: no network at all
    assert runner.run(ensure_local(node, str(llama), blocks=None, client_part=True), timeout=10) == llama
    # config and tokenizer only (what a server reads before it picks its span)
    files_only = runner.run(ensure_local(node, swarm.model_id, blocks=None, client_part=False,
                                         cache_dir=tmp_path / "files-only"), timeout=60)
    assert Checkpoint(files_only).spec == Checkpoint(llama).spec and not list(files_only.glob("*.safetensors"))
    assert load_tokenizer(files_only).encode("hello") == load_tokenizer(llama).encode("hello")
    assert checkpoint_fingerprint(files_only) == swarm.model_id


def test_a_corrupt_seeder_is_banned_and_the_fetch_completes(client, swarm: Swarm, llama: Path,
                                                             tmp_path: Path) -> None:
    runner, node = client
    (bad,) = start_seeders(llama, swarm.maddrs, 1, "--corrupt-pieces")
    try:
        bad_id = bad.read_json(timeout=120)["peer_id"]
        good_id = swarm.ids()[0]
        result: FetchResult = runner.run(fetch(node, swarm.model_id, cache_dir=tmp_path, peers={bad_id, good_id},
                                               bans=PeerBans()), timeout=60)
    finally:
        bad.stop()
    stats = result.stats
    assert set(stats.seeders) == {bad_id, good_id}
    assert stats.banned == [bad_id] and stats.rejected_by_peer[bad_id] >= 1
    assert set(stats.pieces_by_peer) == {good_id}
    assert checkpoint_fingerprint(result.path) == swarm.model_id
    assert same_tensors(result.path, llama, sorted(manifest_tensors(result.manifest.doc)))
    served = json.loads(bad.poll_line(5) or "{}").get("served", {})
    assert served.get(node.peer_id, 0) >= 1  # it did send (wrong) pieces, and was dropped


def test_a_seeder_with_an_upload_cap_serves_a_whole_fetch(client, swarm: Swarm, llama: Path, tmp_path: Path) -> None:
    runner, node = client
    (capped,) = start_seeders(llama, swarm.maddrs, 1, "--max-upload", "4")
    try:
        capped_id = capped.read_json(timeout=120)["peer_id"]
        result: FetchResult = runner.run(fetch(node, swarm.model_id, cache_dir=tmp_path, peers={capped_id},
                                               bans=PeerBans()), timeout=120)
    finally:
        capped.stop()
    assert set(result.stats.pieces_by_peer) == {capped_id}
    assert checkpoint_fingerprint(result.path) == swarm.model_id
    assert same_tensors(result.path, llama, sorted(manifest_tensors(result.manifest.doc)))


@pytest.mark.parametrize("flag", ["0", "-3", "nan"])
def test_a_bad_upload_cap_is_a_clear_error(flag: str) -> None:
    proc = subprocess.run(meshinfer_argv("seed", ".", "--max-upload", flag), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--max-upload must be > 0" in proc.stderr


def test_a_download_cap_holds_a_fetch_to_its_rate(client, swarm: Swarm, llama: Path, tmp_path: Path) -> None:
    runner, node = client
    rate = 400_000.0  # bytes/s over both seeders; the tiny Llama is about 0.9 MB
    result: FetchResult = runner.run(fetch(node, swarm.model_id, cache_dir=tmp_path, max_download=rate,
                                           bans=PeerBans()), timeout=120)
    stats = result.stats
    assert set(stats.pieces_by_peer) == set(swarm.ids())  # still spread over both seeders
    assert checkpoint_fingerprint(result.path) == swarm.model_id
    assert same_tensors(result.path, llama, sorted(manifest_tensors(result.manifest.doc)))
    # Every piece is booked from one bucket of a quarter second's credit before it is asked for, so however
    # fast the machine, the bytes cannot have come in faster than that (a lower bound: it cannot flake slow).
    assert stats.bytes_fetched > rate
    assert stats.seconds >= 0.98 * (stats.bytes_fetched - rate / 4) / rate, stats.as_dict()
    assert stats.throttled_seconds > 0 and stats.as_dict()["throttled_seconds"] > 0


def test_fetching_without_a_node_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not in the cache and no peer node was given"):
        asyncio.run(fetch(None, "0" * 32, cache_dir=tmp_path))


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan")])
def test_a_bad_download_cap_is_a_clear_error(cap: float, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="download cap must be > 0"):
        asyncio.run(fetch(None, "0" * 32, cache_dir=tmp_path, max_download=cap))
    proc = subprocess.run(meshinfer_argv("fetch", "0" * 32, "--max-download", str(cap), "--initial-peers",
                                         "/ip4/127.0.0.1/tcp/1/p2p/QmNotUsed"), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--max-download must be > 0 MB/s" in proc.stderr, proc.stderr


def _verified_on_disk(cache: Path, manifest: Manifest) -> tuple[set[PieceRef], set[PieceRef]]:
    """(pieces of finished groups, verified pieces of partial files) in the cache right now."""
    store = ModelStore(cache, manifest)
    finished: set[PieceRef] = set()
    verified: set[PieceRef] = set()
    for group in manifest.groups_for(Want.whole()):
        pieces = set(manifest.pieces_of(group))
        if store.is_complete(group):
            finished |= pieces
        elif (store.path / (group_filename(group) + PARTIAL_SUFFIX)).is_file():
            partial = store.begin(group)
            verified |= pieces - set(partial.open())
            partial.close()
    return finished, verified


def test_an_interrupted_fetch_resumes_without_fetching_verified_pieces_again(client, swarm: Swarm, llama: Path,
                                                                             tmp_path: Path) -> None:
    runner, node = client

    async def interrupted() -> bool:
        task: asyncio.Task[FetchResult] | None = None

        def stop_midway(p: FetchProgress) -> None:
            if p.done_pieces >= 14 and task is not None:
                task.cancel()

        task = asyncio.create_task(fetch(node, swarm.model_id, cache_dir=tmp_path, progress=stop_midway,
                                         per_peer=1, bans=PeerBans()))
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert runner.run(interrupted(), timeout=60)
    manifest = ModelStore.stored_manifest(tmp_path, swarm.model_id)
    assert manifest is not None
    total = {p for g in manifest.groups_for(Want.whole()) for p in manifest.pieces_of(g)}
    finished, verified = _verified_on_disk(tmp_path, manifest)
    assert len(finished | verified) >= 14 and len(finished | verified) < len(total)

    result: FetchResult = runner.run(fetch(node, swarm.model_id, cache_dir=tmp_path, bans=PeerBans()), timeout=60)
    stats = result.stats
    assert stats.fetched == total - finished - verified
    assert sum(stats.requests_by_peer.values()) == len(stats.fetched)  # nothing asked twice
    assert stats.reused_pieces == len(verified)
    assert checkpoint_fingerprint(result.path) == swarm.model_id
    assert same_tensors(result.path, llama, sorted(manifest_tensors(manifest.doc)))
    assert not list(result.path.glob("*" + PARTIAL_SUFFIX))


def test_budget_and_unknown_models_are_clear_errors(client, swarm: Swarm, tmp_path: Path) -> None:
    runner, node = client
    with pytest.raises(ConfigError, match=r"needs .* more.*--max-cache-bytes 100000\)") as err:
        runner.run(fetch(node, swarm.model_id, cache_dir=tmp_path, max_cache_bytes=100_000), timeout=60)
    assert "\n" not in str(err.value)
    written = [p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]
    assert written == []  # refused before writing anything
    with pytest.raises(CheckpointError, match=r"no peer in the swarm seeds model 0{32}"):
        runner.run(fetch(node, "0" * 32, cache_dir=tmp_path, find_timeout=1.0), timeout=60)
    with pytest.raises(ConfigError, match="not a model id"):
        runner.run(fetch(node, "my-model", cache_dir=tmp_path), timeout=10)
    with pytest.raises(ConfigError, match=r"is neither a checkpoint directory, a \.gguf file, a model id, a hub name"):
        runner.run(ensure_local(node, "no such thing!", blocks=None, client_part=True), timeout=10)
    with pytest.raises(ConfigError, match="exceeds the model's 4 blocks"):
        runner.run(fetch(node, swarm.model_id, want=Want(blocks=BlockRange(3, 9)), cache_dir=tmp_path), timeout=60)


def test_bad_piece_requests_get_typed_errors_and_the_seeder_keeps_serving(client, swarm: Swarm) -> None:
    runner, node = client
    seeder = swarm.seeders[0]

    async def talk(direct: bool) -> list[Any]:
        stream = await node.open_stream(seeder["peer_id"], PIECES_PROTOCOL, maddrs=seeder["maddrs"],
                                        direct=seeder["direct_addresses"] if direct else ())
        mid = swarm.model_id
        requests: list[bytes] = [
            b"\x93junk",
            encode_piece_message(GetPiece(model_id="f" * 32, kind="tensor", name="lm_head.weight", index=0)),
            encode_piece_message(GetPiece(model_id=mid, kind="tensor", name="no.such.tensor", index=0)),
            encode_piece_message(GetPiece(model_id=mid, kind="tensor", name="lm_head.weight", index=99)),
            encode_piece_message(GetPiece(model_id=mid, kind="file", name="../../etc/passwd", index=0)),
            encode_piece_message(ManifestData(model_id=mid, data=b"{}")),
            msgspec.msgpack.encode({"type": "get_manifest", "model_id": mid, "v": 9}),
            msgspec.msgpack.encode({"type": "get_piece", "model_id": mid, "kind": "file", "name": "x" * 600,
                                    "index": 0}),
            encode_piece_message(GetManifest(model_id=mid)),
            encode_piece_message(GetPiece(model_id=mid, kind="tensor", name="model.layers.2.mlp.up_proj.weight",
                                          index=0)),
        ]
        replies = []
        async with stream:
            for payload in requests:
                await stream.send_bytes(payload)
                replies.append(decode_piece_message(await stream.recv_bytes(timeout=10)))
        return replies

    for direct in (True, False):  # the direct data plane and libp2p
        replies = runner.run(talk(direct), timeout=60)
        codes = [r.code if isinstance(r, PieceError) else type(r).__name__ for r in replies]
        assert codes == ["bad_request", "unknown_model", "unknown_piece", "unknown_piece", "unknown_piece",
                         "bad_request", "version_mismatch", "limit_exceeded", "ManifestData", "PieceData"], codes
        manifest = Manifest.from_bytes(replies[-2].data, swarm.model_id)
        piece = replies[-1]
        assert isinstance(piece, PieceData)
        found = manifest.item("tensor", "model.layers.2.mlp.up_proj.weight")
        assert found is not None and hashlib.sha256(piece.data).hexdigest() == found[1].pieces[0]


def test_fetch_command_gets_the_client_part(swarm: Swarm, llama: Path, tmp_path: Path) -> None:
    out = subprocess.run(meshinfer_argv("fetch", swarm.model_id, "--client-part", "--json", "--no-progress",
                                        "--max-download", "50", "--cache-dir", str(tmp_path),
                                        "--initial-peers", *swarm.maddrs),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    path = Path(doc["path"])
    assert doc["model_id"] == swarm.model_id and doc["pieces_fetched"] >= 3 and doc["banned"] == []
    assert doc["throttled_seconds"] >= 0  # --max-download reached the fetch (50 MB/s: little or no wait)
    assert same_tensors(path, llama, ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    with pytest.raises(CheckpointError):
        Checkpoint(path).load_span(BlockRange(0, 1))
    bad = subprocess.run(meshinfer_argv("fetch", "not-an-id", "--initial-peers", *swarm.maddrs),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "not a model id" in bad.stderr
