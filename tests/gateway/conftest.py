"""Fixtures for gateway tests: one real 3-server swarm of a tiny checkpoint with the gateway in front of it.

The swarm (a bootstrap peer and three ``meshinfer serve`` processes on 127.0.0.1) is started once for all
gateway tests that ask for it, with one ``DistributedModel`` joined to it and the gateway app served by
uvicorn on the client's own loop (as `meshinfer api` does) on a free port; a ``LocalModel`` of the same
checkpoint is the reference.
Everything is stopped at teardown (processes by PID, checking none of their children survive).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from gateway_helpers import CACHE_TOKENS, MODEL_NAME, SPANS, Served


@pytest.fixture(scope="session")
def served() -> Iterator[Served]:
    from meshinfer.client.model import DistributedModel
    from meshinfer.gateway.app import create_app
    from meshinfer.gateway.generation import SwarmGenerator
    from meshinfer.gateway.serving import ApiServer
    from meshinfer.models.engine import LocalModel
    from meshinfer.testing.checkpoints import tiny_checkpoint
    from meshinfer.testing.procs import wait_gone
    from meshinfer.testing.swarm import LocalSwarm

    model_dir = tiny_checkpoint("llama", variant="llama3")  # 512 tokens of context
    swarm = LocalSwarm(model_dir, SPANS, server_args=("--cache-tokens", str(CACHE_TOKENS)),
                       startup_timeout=120).start()
    tree = [pid for s in swarm.servers for pid in s.proc.descendants()]
    try:
        with contextlib.ExitStack() as stack:
            model = stack.enter_context(DistributedModel.from_pretrained(model_dir, swarm.initial_peers))
            app = create_app(SwarmGenerator(model), MODEL_NAME)
            server = stack.enter_context(ApiServer(app, loop=model.loop))  # as `meshinfer api` serves it
            yield Served(model_dir, swarm, model, LocalModel.from_pretrained(model_dir), server, app)
    finally:
        swarm.stop()
        assert not wait_gone(tree, timeout=10), f"processes left behind: {tree}"
