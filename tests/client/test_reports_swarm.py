"""Reports through a real swarm (issue 19, D5): one client publishes evidence against a lying server, another
client verifies it (fetching the blob from the reporter over ``meshinfer/evidence/1`` and recomputing through the
honest server, neither accused nor reporter) and stops routing to the liar; a report against the honest server
is found false and changes nothing.

Three servers of the tiny llama's blocks 0:4 as separate processes: index 0 lies (``wrong`` outputs,
``meshinfer.testing.dishonest``), 1 and 2 are honest (a report is recomputed by servers that are neither accused
nor reporter, and one found true is confirmed by a second one). The reporting client picks its route by hand (the
audit that would find the lie is helper "audit"'s); everything else is the real path: signed commits from the
servers, the client's commit logs, ``evidence_for``, the DHT record, the stream, the verification and the planner.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TypeVar

import pytest
import torch
from report_helpers import accuse, on

from meshinfer.client.evidence import evidence_for
from meshinfer.client.model import DistributedModel
from meshinfer.client.routing import RouteHop
from meshinfer.client.session import InferenceSession
from meshinfer.testing.checkpoints import tiny_checkpoint
from meshinfer.testing.swarm import LocalSwarm
from meshinfer.types import BlockRange
from meshinfer.wire.evidence import EvidenceBlob

pytestmark = pytest.mark.slow
T = TypeVar("T")


def test_a_verified_report_makes_other_clients_avoid_the_liar(liar_trio: LocalSwarm) -> None:
    liar, honest = liar_trio.servers[0].peer_id, liar_trio.servers[1].peer_id
    model_dir = tiny_checkpoint("llama")
    with contextlib.ExitStack() as stack:
        reporter, other = (stack.enter_context(DistributedModel.from_pretrained(  # checks by hand: no upkeep checks
            model_dir, liar_trio.initial_peers, route_wait=5.0, report_check_s=0.0)) for _ in range(2))
        false_report = on(reporter, accuse(reporter, honest))
        true_report = on(reporter, accuse(reporter, liar))
        assert reporter.view.reputation.reported() >= {liar}

        unchecked: dict[bytes, str] = {}  # the last reason each report could not be checked (for the failure text)

        async def check() -> dict[bytes, str]:
            seen: dict[bytes, str] = {}
            deadline = time.monotonic() + 90  # the records take a moment to reach the DHT (longer on a loaded box)
            while len(seen) < 2 and time.monotonic() < deadline:
                for record, outcome in await other.view.check_reports(other.ref):
                    if outcome.startswith("unchecked"):
                        unchecked[record.blob_sha256] = outcome
                    else:
                        seen[record.blob_sha256] = outcome
                await asyncio.sleep(0.5)
            return seen

        seen = on(other, check())
        assert seen.get(true_report.blob_sha256) == "verified", (seen, unchecked)
        # recomputed by the other honest server: false; by the liar (not yet known): confirmed by the other honest
        # server, which disagrees: disputed. Never believed.
        assert seen.get(false_report.blob_sha256) in ("false", "disputed"), (seen, unchecked)
        assert other.view.reputation.reported() == {liar}
        for _ in range(5):  # spread draws at random: every plan avoids the liar
            route = on(other, other.view.plan(other.ref))
            assert len(route) == 1 and route[0].peer_id != liar


def test_evidence_binds_a_replacement_hop_after_a_failover(liar_trio: LocalSwarm) -> None:
    """A session's server is killed mid-generation; the replacement's chain starts with the replayed history (one
    chunked step) and its evidence still checks out (recovery records what the replay sent and got back)."""
    from meshinfer.client.reports import check_evidence, local_recompute, make_report, verify_report
    from meshinfer.models.checkpoint import Checkpoint

    liar = liar_trio.servers[0].peer_id
    victim = liar_trio.add_server((0, 4))
    model_dir = tiny_checkpoint("llama")
    with DistributedModel.from_pretrained(model_dir, liar_trio.initial_peers, route_wait=5.0) as model:
        async def run() -> tuple[EvidenceBlob, str]:
            async def replan(blocks: BlockRange, exclude: frozenset[str]) -> list[RouteHop]:
                return await model.view.plan(model.ref, blocks=blocks, exclude=exclude | {liar, victim.peer_id})

            cov = await model.view.coverage(model.ref, refresh=True)
            route = [RouteHop(victim.peer_id, BlockRange(0, 4), cov.servers[victim.peer_id])]
            session = await InferenceSession.open(model.view.node, route, model_id=model.model_id, max_length=64,
                                                  replan=replan, bans=model.view.bans)
            gen = torch.Generator().manual_seed(1)
            try:
                for k in range(24):
                    if k == 6:
                        liar_trio.stop_server(victim, graceful=False)
                    await session.step(torch.randn(5 if k == 0 else 1, 64, generator=gen))
                assert [f.peer_id for f in session.failovers] == [victim.peer_id]
                blob = evidence_for(session, 0, 12, 24)  # the commit at 16 steps covers 0:25
                return blob, session.hops[0].hop.peer_id
            finally:
                await session.close()

        blob, replacement = on(model, run())
    assert isinstance(blob, EvidenceBlob), blob
    assert blob.accused == replacement and blob.entries[0].tokens >= 10  # the replay: positions 0:10 in one step
    record, data = make_report(blob, reporter="QmSomeoneElse")
    check_evidence(record, data)
    span = Checkpoint(model_dir).load_span(BlockRange(0, 4))
    assert not asyncio.run(verify_report(record, data, local_recompute(span))).verified  # an honest replacement
