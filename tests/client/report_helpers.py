"""Helpers of the report tests (tests/client/test_reports_swarm.py, test_audit_tallies_swarm.py): run a coroutine on
a ``DistributedModel``'s loop, and publish a report against a server from a session of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch

from meshinfer.client.evidence import evidence_for
from meshinfer.client.model import DistributedModel
from meshinfer.client.routing import RouteHop
from meshinfer.client.session import InferenceSession
from meshinfer.types import BlockRange
from meshinfer.wire.evidence import EvidenceBlob
from meshinfer.wire.records import ReportRecord

T = TypeVar("T")


def on(model: DistributedModel, coro: Coroutine[Any, Any, T], timeout: float = 180) -> T:
    """Run ``coro`` on ``model``'s event loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, model.loop).result(timeout=timeout)


async def accuse(model: DistributedModel, peer: str) -> ReportRecord:
    """Run 14 steps (positions 0:18) on ``peer`` alone (blocks 0:4 of the tiny llama), the last asking for a commit
    (``want_commit``: before the 16 steps of a regular one), and publish the evidence for positions 5:18."""
    cov = await model.view.coverage(model.ref, refresh=True)
    route = [RouteHop(peer, BlockRange(0, 4), cov.servers[peer])]
    session = await InferenceSession.open(model.view.node, route, model_id=model.model_id, max_length=64)
    gen = torch.Generator().manual_seed(0)
    try:
        for k, t in enumerate([5] + [1] * 13):
            session.want_commit = k == 13
            await session.step(torch.randn(t, 64, generator=gen))
        blob = evidence_for(session, 0, 5, 18)
    finally:
        await session.close()
    assert isinstance(blob, EvidenceBlob), blob
    return await model.view.report(blob)
