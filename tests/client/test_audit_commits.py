"""Audits judge only what a hop signed (design D4), and a rewind keeps each hop's steps aligned with its history.

No processes: a hop's results and its signed commits are made here with a real ``CommitChain`` and key, read by a
real ``CommitLog``, as ``client.hops`` would; the hop and the session around the ``Auditor`` are plain namespaces
(only the fields the tested code reads). What is checked: ``committed_upto`` (where evidence can reach),
``truncate_steps`` (a rewind's cut step), ``build_evidence`` refusing a cut step, and the auditor's window ends and
commit requests.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from meshinfer.client.audit import AuditCounters, Auditor, truncate_parts, truncate_steps
from meshinfer.client.audit_reports import Reporter
from meshinfer.client.audit_window import Shadow
from meshinfer.client.config import ClientConfig
from meshinfer.client.evidence import EvidenceUnavailable, build_evidence, committed_upto
from meshinfer.p2p.commit import CommitChain, CommitLog, sign_commit
from meshinfer.p2p.identity import Identity
from meshinfer.types import BlockRange
from meshinfer.wire.evidence import EvidenceBlob
from meshinfer.wire.messages import StepResult
from meshinfer.wire.tensor import encode_tensor

SPAN = BlockRange(0, 2)
MODEL = "0123456789abcdef0123456789abcdef"
H = 8


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


class Obj(SimpleNamespace):
    """A namespace with identity semantics (a dict key, as a ``HopSession``)."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__


class Hop:
    """A server's side (chain) and the client's record (log, steps, inputs, outputs) of one hop."""

    def __init__(self, ident: Identity, every: int = 4) -> None:
        self.ident = ident
        self.chain = CommitChain(MODEL, SPAN, "sess", ident.peer_id, every=every)
        record = SimpleNamespace(dtype="float32")
        self.hs: Any = Obj(commits=CommitLog(MODEL, SPAN, "sess", ident.peer_id), steps=[], inputs=[],
                           outputs=[], hop=SimpleNamespace(peer_id=ident.peer_id, span=SPAN, record=record),
                           where=lambda: "hop")
        self.position = 0
        self.gen = torch.Generator().manual_seed(3)

    def step(self, tokens: int, want_commit: bool = False) -> None:
        step_id = self.chain.steps + 1000
        x, y = torch.randn(tokens, H, generator=self.gen), torch.randn(tokens, H, generator=self.gen)  # [T, H]
        wx, wy = encode_tensor(x), encode_tensor(y)
        self.chain.extend(step_id, self.position, tokens, wx.data, wy.data)
        commit = sign_commit(self.ident, "sess", self.chain.seal()) if self.chain.due or want_commit else None
        self.hs.commits.record(StepResult(session_id="sess", step_id=step_id, hidden=wy, commit=commit))
        self.hs.steps.append((step_id, self.position, tokens))
        self.hs.inputs.append(x)
        self.hs.outputs.append(y)
        self.position += tokens

    def rewind(self, position: int) -> None:
        self.hs.inputs = truncate_parts(self.hs.inputs, position)
        self.hs.outputs = truncate_parts(self.hs.outputs, position)
        self.hs.steps = truncate_steps(self.hs.steps, position)
        self.position = position

    def evidence(self, a: int, b: int) -> EvidenceBlob | EvidenceUnavailable:
        hs = self.hs
        return build_evidence(hs.commits, hs.steps, torch.cat(hs.inputs), torch.cat(hs.outputs), a, b,
                              dtype="float32")


def test_truncate_steps_stays_aligned_with_the_parts() -> None:
    steps = [(0, 0, 5), (1, 5, 1), (2, 6, 1)]
    parts = [torch.zeros(5, H), torch.zeros(1, H), torch.zeros(1, H)]
    for position in range(8):
        kept = truncate_steps(steps, position)
        assert sum(t for _, _, t in kept) == position == sum(p.shape[0] for p in truncate_parts(parts, position))
    assert truncate_steps(steps, 3) == [(0, 0, 3)]  # the straddling step: cut to what the parts keep
    assert truncate_steps(steps, 6) == [(0, 0, 5), (1, 5, 1)]
    assert truncate_steps(steps, 0) == []


def test_committed_upto_follows_the_signed_commits(ident: Identity) -> None:
    hop = Hop(ident)
    for tokens in (5, 1, 1):
        hop.step(tokens)
    assert committed_upto(hop.hs) == (0, None)  # nothing signed yet: waiting can help
    hop.step(1)  # the 4th result: a regular commit
    assert committed_upto(hop.hs) == (8, None)
    hop.step(1)
    assert committed_upto(hop.hs) == (8, None)
    assert isinstance(hop.evidence(3, 8), EvidenceBlob)
    assert isinstance(hop.evidence(3, 9), EvidenceUnavailable)  # beyond the commit
    hop.step(1, want_commit=True)
    assert committed_upto(hop.hs) == (10, None)
    blob = hop.evidence(9, 10)
    assert isinstance(blob, EvidenceBlob) and blob.commit_steps == 6


def test_a_rewind_inside_a_step_makes_it_unprovable_and_says_why(ident: Identity) -> None:
    hop = Hop(ident)
    for tokens in (5, 1, 1, 1):
        hop.step(tokens)
    hop.rewind(6)  # on a step boundary: everything kept is still provable
    assert committed_upto(hop.hs) == (6, None)
    assert isinstance(hop.evidence(2, 6), EvidenceBlob)
    hop.rewind(3)  # inside the 5-token step the hop signed
    upto, stuck = committed_upto(hop.hs)
    assert upto == 0 and stuck is not None and "rollback" in stuck
    evidence = hop.evidence(1, 3)
    assert isinstance(evidence, EvidenceUnavailable) and "rollback" in evidence.reason


def test_broken_commits_are_stuck(ident: Identity) -> None:
    hop = Hop(ident)
    hop.step(5)
    hop.hs.commits.broken = "forged"
    assert committed_upto(hop.hs) == (0, "the hop's commits were refused: forged")


def _auditor(hop: Hop, position: int) -> tuple[Auditor, Any]:
    session: Any = SimpleNamespace(config=ClientConfig(audit_every=4), quant=None, position=position,
                                   hops=[hop.hs], want_commit=False)
    return Auditor(session, find=None, counters=AuditCounters(), rng=random.Random(0)), session  # type: ignore[arg-type]


def test_checks_end_at_the_signed_commit_except_at_the_end(ident: Identity) -> None:
    hop = Hop(ident, every=16)
    auditor, session = _auditor(hop, 0)
    auditor.before_step(5)  # a new hop: its first check comes right after this step
    assert session.want_commit
    hop.step(5, want_commit=True)
    session.want_commit = False
    for _ in range(3):
        hop.step(1)
    session.position = hop.position  # 8: [0, 5) signed
    shadow = Shadow(hop.hs, hs=SimpleNamespace())  # type: ignore[arg-type]
    auditor._shadows[hop.hs] = shadow
    assert auditor._window_end(shadow, 8, final=False) == 5  # never beyond the commit
    assert auditor._window_end(shadow, 8, final=True) == 8  # the generation's end: judged anyway
    shadow.verified = 5
    assert auditor._window_end(shadow, 8, final=False) is None  # wait for the next commit
    auditor.before_step(1)  # a check is due after this step (9 - 5 >= 4): ask for a commit
    assert session.want_commit
    hop.step(1, want_commit=True)
    session.position = hop.position
    assert auditor._window_end(shadow, 9, final=False) == 9
    assert auditor.counters.peer(ident.peer_id).uncommitted == 0


def test_a_hop_that_does_not_commit_when_asked_is_judged_and_counted(ident: Identity) -> None:
    hop = Hop(ident, every=16)
    auditor, session = _auditor(hop, 0)
    auditor.before_step(5)
    assert session.want_commit
    hop.step(5)  # asked, but no commit came
    session.position = hop.position
    shadow = Shadow(hop.hs, hs=SimpleNamespace())  # type: ignore[arg-type]
    auditor._shadows[hop.hs] = shadow
    assert auditor._window_end(shadow, 5, final=False) == 5  # judged anyway (a lie there: not reportable)
    assert auditor.counters.peer(ident.peer_id).uncommitted == 1
    assert shadow.uncommitted is not None


def test_a_rollback_cut_step_is_not_the_hops_fault(ident: Identity) -> None:
    hop = Hop(ident, every=16)
    auditor, session = _auditor(hop, 0)
    hop.step(5, want_commit=True)
    hop.rewind(3)
    auditor.rewind(3)
    hop.step(2)
    session.position = hop.position
    shadow = Shadow(hop.hs, hs=SimpleNamespace())  # type: ignore[arg-type]
    auditor._shadows[hop.hs] = shadow
    assert auditor._window_end(shadow, 5, final=False) == 5
    assert auditor.counters.peer(ident.peer_id).uncommitted == 0


def test_a_detection_becomes_evidence_only_inside_the_signed_commit(ident: Identity) -> None:
    hop = Hop(ident, every=16)
    hop.step(5, want_commit=True)
    hop.step(1)
    hop.step(1)
    session: Any = SimpleNamespace(dtype="float32", quant=None, position=hop.position)
    counters = AuditCounters()
    sent: list[tuple[EvidenceBlob, str]] = []

    async def report(blob: EvidenceBlob, *, verifier_dtype: str = "") -> None:
        sent.append((blob, verifier_dtype))

    async def run() -> None:
        reporter = Reporter(session, counters, report)
        reporter.publish(hop.hs, 5, 7, "bfloat16")  # beyond the commit (it ends at 5): no evidence
        reporter.publish(hop.hs, 2, 7, "bfloat16")  # [2, 5): inside it
        while reporter.pending:
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert counters.unreportable == 1 and counters.reports == 1
    [(blob, dtype)] = sent
    assert (blob.window_start, blob.window_end, dtype) == (2, 5, "bfloat16")
