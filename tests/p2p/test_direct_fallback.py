"""Falling back from the direct data plane to libp2p when a server's direct address cannot be dialled.

Two servers (blocks 0:2 and 2:4) announce, with ``--direct-announce``, a direct address where nobody listens (a
server behind NAT whose port is not forwarded looks the same to others). The client's stream to the first server
and the first server's push to the second must both go over libp2p instead, and the tokens must equal the local
model's exactly.
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.procs import meshinfer_argv
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow

PROMPT = "The keeper climbed the tower"
NEW_TOKENS = 12


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])  # closed when this returns: connections there are refused


def test_generation_falls_back_to_libp2p_when_the_direct_plane_is_closed() -> None:
    from meshinfer.models.engine import LocalModel

    model_dir = tiny_checkpoint("llama")
    reference = LocalModel.from_pretrained(model_dir)
    expected = reference.generate(reference.tokenizer(PROMPT)["input_ids"], NEW_TOKENS)
    args = ["--direct-announce", f"127.0.0.1:{closed_port()}"]
    with LocalSwarm(model_dir, spans=[(0, 2), (2, 4)], server_args=args) as swarm:
        gen = subprocess.run(meshinfer_argv("generate", "--model", str(model_dir), "--initial-peers",
                                            *swarm.initial_peers, "--prompt", PROMPT, "--max-new-tokens",
                                            str(NEW_TOKENS), "--json"), capture_output=True, text=True, timeout=240)
        assert gen.returncode == 0, gen.stderr
        doc = json.loads(gen.stdout)
        assert len(doc["route"]) == 2, doc
        assert doc["generated_token_ids"] == expected
