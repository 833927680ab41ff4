"""Credits with real processes: a generation leaves signed receipts on the servers that did the work, and
``meshinfer credits`` (another process, verifying every signature itself) shows the work served and used."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_helpers import start_swarm, stop_swarm

from meshinfer.client.model import DistributedModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 7, 99, 3]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def swarm(meshinfer_cache_dir: Path, bootstrap: list[str]) -> Iterator[LocalSwarm]:
    swarm = start_swarm(tiny_checkpoint("llama", seed=523), [(0, 1), (1, 4)], bootstrap)
    try:
        yield swarm
    finally:
        stop_swarm(swarm)


def test_a_generation_leaves_receipts_that_anyone_can_check(swarm: LocalSwarm) -> None:
    # without speculation, so the work is exactly the prefill and one step per token (drafts are work too)
    with DistributedModel.from_pretrained(swarm.model_dir, swarm.initial_peers, speculate=False) as client:
        client.generate(PROMPT, NEW_TOKENS, stop_token_ids=())
        me = client.view.node.peer_id
        sender = client.receipts
        sender_done = asyncio.run_coroutine_threadsafe(sender.flush(), client.loop) if sender else None
        if sender_done is not None:
            sender_done.result(30)
        # the dashboard's credits panel reads the same receipts through the swarm document
        node = client.view.node
        panel = asyncio.run_coroutine_threadsafe(_panel(node), client.loop).result(60)
    assert sender is not None and sender.refused == 0 and sender.handed >= 2
    out = subprocess.run(meshinfer_argv("credits", "--json", "--initial-peers", *swarm.initial_peers),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    rows = {p["peer_id"]: p for p in doc["peers"]}
    tokens = len(PROMPT) + NEW_TOKENS - 1  # the prefill, then one step per generated token but the last
    first, second = swarm.servers
    assert rows[first.peer_id]["served"] == tokens * 1 and rows[second.peer_id]["served"] == tokens * 3
    assert rows[me]["used"] == tokens * 4 and rows[me]["credit"] == -tokens * 4
    assert all(isinstance(doc["asked"][s.peer_id], int) for s in swarm.servers)
    # the panel read while the client was still open: the final receipts may not all be in yet, never more
    panel_rows = {p["peer_id"]: p for p in panel["peers"]}
    assert 0 < panel_rows[second.peer_id]["served"] <= rows[second.peer_id]["served"]


async def _panel(node: Any) -> dict[str, Any]:
    from meshinfer.dashboard.credits import read_credits
    from meshinfer.dashboard.doc import swarm_doc

    return await read_credits(node, await swarm_doc(node, 10.0), 10.0)
