"""The whole path with only a model id: two ``meshinfer seed`` processes hold a checkpoint; servers started with
``--model MODEL_ID`` fetch their spans' pieces from the seeders (verified), serve, and a client that also knows
only the id fetches the client part; distributed greedy generation equals the local engine on the original."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from meshinfer.client.model import DistributedModel
from meshinfer.models.engine import LocalModel
from meshinfer.models.fingerprint import checkpoint_fingerprint
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv, start_dht
from meshinfer.testing.swarm import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_servers_and_client_started_with_only_a_model_id_generate_like_the_original(
        meshinfer_cache_dir: Path) -> None:
    original = tiny_checkpoint("llama", seed=33)
    model_id = checkpoint_fingerprint(original)
    prompt = [11, 5, 42, 7, 19]
    want = LocalModel.from_pretrained(original).generate(prompt, 16, stop_token_ids=())
    dht, maddrs = start_dht(timeout=90)
    seeders = [ManagedProcess(meshinfer_argv("seed", str(original), "--initial-peers", *maddrs,
                                             "--stop-on-stdin-eof"), name="meshinfer seed") for _ in range(2)]
    try:
        for seeder in seeders:
            assert model_id in seeder.read_json(timeout=120)["models"]
        swarm = LocalSwarm(Path(model_id), [(0, 2), (2, 4)], initial_peers=maddrs, startup_timeout=180,
                           server_args=["--max-download", "100"])  # a cap the fetch never reaches
        try:
            swarm.start()
            for server in swarm.servers:
                assert server.info["model_id"] == model_id
            with DistributedModel.from_pretrained(model_id, maddrs, max_download=100e6) as client:
                assert client.model_id == model_id and client.path != original
                assert client.generate(prompt, 16, stop_token_ids=()) == want
                assert [h.peer_id for h in client.last_route] == [s.peer_id for s in swarm.servers]
        finally:
            swarm.stop()
    finally:
        for proc in seeders:
            with contextlib.suppress(Exception):
                proc.stop()
        dht.stop()
