"""Directory poisoning (issue 17, finding 1) against real processes on 127.0.0.1.

A ``meshinfer dht`` bootstrap and two ``meshinfer serve`` processes of the tiny Llama; then a hostile peer
(``scripts/attacks/directory_poison.py --attacker``: its own key, raw msgpack straight into hivemind) stores
300 model cards claiming 100,000 blocks (directory entries and ``model:`` keys), 300 well-formed cards at the
4096-block bound and 400 server records of models that do not exist. ``meshinfer swarm --json`` must still
list the real model with its real servers, within twice its clean time (plus slack for a shared machine),
and a generation through the swarm must give exactly the local model's tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import ManagedProcess, meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

ATTACKER = Path(__file__).resolve().parents[2] / "scripts" / "attacks" / "directory_poison.py"
PROMPT = "The keeper climbed the tower"


def swarm_json(peers: list[str]) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    out = subprocess.run(meshinfer_argv("swarm", "--json", "--initial-peers", *peers), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return time.monotonic() - t0, json.loads(out.stdout)


def test_a_flooded_directory_still_lists_the_real_servers_and_generation_is_exact() -> None:
    from meshinfer.models.engine import LocalModel

    model_dir = tiny_checkpoint("llama")
    reference = LocalModel.from_pretrained(model_dir)
    prompt_ids = reference.tokenizer(PROMPT)["input_ids"]
    expected = reference.generate(prompt_ids, 12)
    with LocalSwarm(model_dir, spans=[(0, 2), (2, 4)]) as swarm:
        peers = swarm.initial_peers
        real = {(s.peer_id, str(s.span)) for s in swarm.servers}
        clean_s, _ = swarm_json(peers)
        attacker = ManagedProcess([sys.executable, str(ATTACKER), "--attacker", "--initial-peers", *peers,
                                   "--cards", "300", "--blocks", "100000", "--bound-cards", "300",
                                   "--fake-servers", "400"], name="attacker")
        try:
            stored = attacker.read_json(180)
            assert stored["records"] == 1300
            assert stored["stored"] == 700  # the 600 cards past the block bound are refused by every storer

            attacked_s, doc = swarm_json(peers)
            models = {m["model_id"]: m for m in doc["models"]}
            assert list(models) == [swarm.model_id]  # a card is believed only from a peer serving the model
            mine = models[swarm.model_id]
            assert {(s["peer_id"], s["span"]) for s in mine["servers"]} == real
            assert mine["missing_blocks"] == [] and mine["block_servers"] == [1, 1, 1, 1]
            assert attacked_s < 2 * clean_s + 10, (clean_s, attacked_s)

            gen = subprocess.run(meshinfer_argv("generate", "--model", str(model_dir), "--initial-peers", *peers,
                                                "--prompt", PROMPT, "--max-new-tokens", "12", "--json"),
                                 capture_output=True, text=True, timeout=180)
            assert gen.returncode == 0, gen.stderr
            assert json.loads(gen.stdout)["generated_token_ids"] == expected
        finally:
            attacker.stop()
