"""Audits between honest servers of different dtypes: no false positive.

Two honest servers of all 4 blocks of the tiny llama, one float32 and one bfloat16 (its own module: a swarm of
another module alive at the same time would offer its servers of the same model to these routes).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_helpers import stop_swarm
from test_audits import NEW, PROMPT, steer

from meshinfer.client.model import DistributedModel
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mixed_swarm(bootstrap: list[str]) -> Iterator[LocalSwarm]:
    """Two honest servers of all 4 blocks: one in float32, one in bfloat16."""
    swarm = LocalSwarm(tiny_checkpoint("llama"), [(0, 4)], initial_peers=bootstrap, startup_timeout=120).start()
    try:
        swarm.add_server((0, 4), extra_args=("--dtype", "bfloat16"))
        yield swarm
    finally:
        stop_swarm(swarm)


def test_honest_servers_of_different_dtypes_pass_each_others_audits(mixed_swarm: LocalSwarm) -> None:
    """No false positive between dtypes: the bf16 server audited by the fp32 one, then the other way round."""
    fp32, bf16 = (s.peer_id for s in mixed_swarm.servers)
    for audited, other in ((bf16, fp32), (fp32, bf16)):
        with DistributedModel.from_pretrained(tiny_checkpoint("llama"), mixed_swarm.initial_peers,
                                              route_wait=2.0) as model:
            steer(model, [other], members=[fp32, bf16])
            model.generate(PROMPT, NEW, stop_token_ids=())
            assert [h.peer_id for h in model.last_route] == [audited]
            counters = model.audits
        assert counters.peer(audited).passed >= 2 and counters.peer(audited).failed == 0, counters
        assert counters.unresolved == 0 and counters.detections == 0, counters
