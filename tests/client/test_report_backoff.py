"""``SwarmView.check_reports`` under reports that cannot be checked (their reporter is gone, or never answers):
they back off and queue behind fresh ones, so a pile of them cannot take every round's ``limit`` and starve a new
report (the failure a shared test DHT full of older modules' reports showed, and a cheap attack on an open swarm).

Pure logic: the DHT read, the evidence fetch and the verification are replaced (monkeypatch); the view is real.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from meshinfer.client import report_service, reports
from meshinfer.client.swarm import SwarmView
from meshinfer.errors import TransportError


@dataclass(frozen=True)
class _Record:
    blob_sha256: bytes
    reporter: str
    accused: str = "QmAccused"
    session_id: bytes = b"s" * 16
    span: str = "0:4"


@dataclass(frozen=True)
class _Verdict:
    verified: bool


class _Node:
    peer_id = "QmThisClient"


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Ten reports whose reporters are gone, then one fresh report whose reporter answers."""
    state: dict[str, Any] = {"records": [_Record(bytes([i]) * 32, "QmGone") for i in range(10)], "fetched": []}

    async def read_reports(node: object, model_id: str, *, timeout: float = 5.0) -> list[_Record]:
        return list(state["records"])

    async def fetch_evidence(node: object, record: _Record, *, timeout: float = 30.0) -> bytes:
        state["fetched"].append(record.blob_sha256)
        if record.reporter == "QmGone":
            raise TransportError("the reporter does not answer")
        return b"evidence"

    async def verify_report(record: object, data: bytes, recompute: object, *args: object) -> _Verdict:
        return _Verdict(True)

    monkeypatch.setattr(report_service, "read_reports", read_reports)
    monkeypatch.setattr(report_service, "fetch_evidence", fetch_evidence)
    monkeypatch.setattr(reports, "verify_report", verify_report)
    return state


def _check(view: SwarmView, limit: int = 8) -> list[tuple[Any, str]]:
    async def recompute(inputs: list[Any]) -> list[Any]:
        return inputs

    class _Ref:
        model_id = "tiny"

    return asyncio.run(view.check_reports(_Ref(), recompute=recompute, limit=limit))  # type: ignore[arg-type]


def test_unverifiable_reports_back_off_and_a_fresh_one_is_checked(world: dict[str, Any]) -> None:
    view = SwarmView(_Node())  # type: ignore[arg-type]
    first = _check(view)
    assert [o for _, o in first] == ["unchecked: the reporter does not answer"] * 8  # the limit, all stale
    fresh = _Record(b"\xff" * 32, "QmAlive")
    world["records"].append(fresh)  # published after the stale ones: last in the DHT's list
    world["fetched"].clear()
    second = _check(view)
    assert (fresh, "verified") in second  # not starved: the 8 tried ones are backing off
    assert len(world["fetched"]) == 3 and view.report_outcomes[fresh.blob_sha256] == "verified"
    world["fetched"].clear()
    third = _check(view)
    assert third == [] and world["fetched"] == []  # everything left is backing off (2 s after one failure)


def test_fresh_reports_go_before_ones_that_failed_before(world: dict[str, Any]) -> None:
    view = SwarmView(_Node())  # type: ignore[arg-type]
    _check(view, limit=10)  # all ten failed once
    for sha in list(view._unchecked):
        view._unchecked[sha] = (1, 0.0)  # their pause is over
    fresh = _Record(b"\xfe" * 32, "QmAlive")
    world["records"].append(fresh)
    out = _check(view, limit=1)
    assert out == [(fresh, "verified")]
    _check(view, limit=10)
    tries = {t for t, _ in view._unchecked.values()}
    assert tries == {2}  # retried once more, each pause now 4 s


def test_own_reports_and_decided_ones_are_never_rechecked(world: dict[str, Any]) -> None:
    view = SwarmView(_Node())  # type: ignore[arg-type]
    world["records"] = [_Record(b"\x01" * 32, "QmThisClient"), _Record(b"\x02" * 32, "QmAlive")]
    assert [o for _, o in _check(view)] == ["verified"]
    world["fetched"].clear()
    assert _check(view) == [] and world["fetched"] == []
