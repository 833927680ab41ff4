""""No independent server to audit" is logged once per (server peer, span) per client, not once per session.

No processes: the sessions around the ``Auditor`` are plain namespaces (only the fields the tested code reads) and
the replanner finds no route, as on a swarm where only one server serves a span. What is checked: a burst of
sessions over the same hops logs one INFO line per (peer, span) and the rest at DEBUG, the unaudited tally still
counts every hop, an independent server appearing (or the time passing) makes a later absence news again, and the
memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import random
from types import SimpleNamespace
from typing import Any

import pytest

from meshinfer.client.audit import AuditCounters, Auditor
from meshinfer.client.audit_tally import UnauditedNotices
from meshinfer.client.config import ClientConfig
from meshinfer.client.routing import NoRouteError
from meshinfer.types import BlockRange

SPANS = [BlockRange(0, 4), BlockRange(4, 8), BlockRange(8, 12)]


class Obj(SimpleNamespace):
    """A namespace with identity semantics (a dict key, as a ``HopSession``)."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__


def hop(peer: str, span: BlockRange) -> Any:
    record = SimpleNamespace(dtype="float32")
    return Obj(hop=SimpleNamespace(peer_id=peer, span=span, record=record), inputs=[], outputs=[], steps=[],
               commits=None, where=lambda: f"server {peer} (blocks {span.start}:{span.end})")


async def no_route(span: BlockRange, exclude: frozenset[str]) -> list[Any]:
    raise NoRouteError(f"no server of blocks {span} outside {sorted(exclude)}")


async def run_sessions(counters: AuditCounters, sessions: int) -> None:
    """``sessions`` sessions over the same three hops, each audited (fraction 1): every shadow search fails."""
    for i in range(sessions):
        session: Any = SimpleNamespace(config=ClientConfig(audit_fraction=1.0), quant=None, position=1,
                                       hops=[hop(f"Qm{k}", span) for k, span in enumerate(SPANS)],
                                       want_commit=False)
        auditor = Auditor(session, find=no_route, counters=counters, rng=random.Random(i))
        auditor.after_step()
        await asyncio.gather(*list(auditor._tasks))


def test_a_burst_of_sessions_logs_each_missing_auditor_once(caplog: pytest.LogCaptureFixture) -> None:
    counters = AuditCounters()
    with caplog.at_level(logging.DEBUG, logger="meshinfer.client.audit"):
        asyncio.run(run_sessions(counters, 16))
    lines = [r for r in caplog.records if "no independent server" in r.getMessage()]
    info = [r for r in lines if r.levelno == logging.INFO]
    assert len(lines) == 16 * 3
    assert sorted(r.getMessage() for r in info) == [
        f"no independent server of blocks {span} to audit server Qm{k} (blocks {span.start}:{span.end})"
        for k, span in enumerate(SPANS)]
    assert all(r.levelno == logging.DEBUG for r in lines if r not in info)
    assert {peer: audits.unaudited for peer, audits in counters.peers.items()} == {"Qm0": 16, "Qm1": 16, "Qm2": 16}


def test_two_clients_each_log_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="meshinfer.client.audit"):
        asyncio.run(run_sessions(AuditCounters(), 4))
        asyncio.run(run_sessions(AuditCounters(), 4))
    assert sum("no independent server" in r.getMessage() for r in caplog.records) == 2 * 3


def test_news_again_after_expiry_or_an_auditor_appearing() -> None:
    notices = UnauditedNotices(forget_after=600.0)
    span = BlockRange(0, 4)
    assert notices.first("A", span, now=0.0)
    assert not notices.first("A", span, now=599.0)
    assert notices.first("B", span, now=599.0)  # another peer
    assert notices.first("A", BlockRange(4, 8), now=599.0)  # another span
    assert notices.first("A", span, now=600.0)  # forgotten after the time
    assert not notices.first("A", span, now=700.0)
    notices.forget("A", span)  # an independent server appeared
    assert notices.first("A", span, now=701.0)


def test_memory_is_bounded() -> None:
    notices = UnauditedNotices(max_entries=8)
    for i in range(100):
        assert notices.first(f"peer{i}", BlockRange(0, 4), now=float(i))
    assert len(notices) == 8
    assert notices.first("peer0", BlockRange(0, 4), now=100.0)  # the oldest were dropped: news again
    assert not notices.first("peer99", BlockRange(0, 4), now=100.0)
