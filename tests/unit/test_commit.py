"""Signed commitments (p2p.commit): the chain, its signature, the server's chain and the client's log."""

from __future__ import annotations

import os

import pytest

from meshinfer.p2p.commit import (
    CommitChain,
    CommitLog,
    SignedCommit,
    chain_head,
    genesis,
    sign_commit,
    verify_chain,
    verify_commit_signature,
)
from meshinfer.p2p.identity import Identity
from meshinfer.types import BlockRange
from meshinfer.wire.messages import Commit, StepResult, decode_message, encode_message
from meshinfer.wire.tensor import Tensor

MID = "0123456789abcdef0123456789abcdef"
SPAN = BlockRange(2, 6)


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def other() -> Identity:
    return Identity.generate()


def _tensor(seed: int) -> Tensor:
    return Tensor(dtype="float32", shape=[1, 4], data=bytes((seed + i) % 256 for i in range(16)))


def _serve(ident: Identity, n: int, every: int = 4, session: str = "s1") -> list[StepResult]:
    """The StepResults an honest server sends for ``n`` one-token steps (a commit every ``every``)."""
    chain = CommitChain(MID, SPAN, session, ident.peer_id, every=every)
    results = []
    for k in range(n):
        x, y = _tensor(k), _tensor(100 + k)
        chain.extend(k, k, 1, x.data, y.data)
        commit = sign_commit(ident, session, chain.seal()) if chain.due else None
        results.append(StepResult(session_id=session, step_id=k, hidden=y, commit=commit))
    return results


def test_head_depends_on_every_field(ident: Identity) -> None:
    base = genesis(MID, SPAN, "s1", ident.peer_id)
    assert base != genesis(MID, BlockRange(2, 5), "s1", ident.peer_id)
    assert base != genesis(MID, SPAN, "s2", ident.peer_id)
    chain = CommitChain(MID, SPAN, "s1", ident.peer_id)
    e = chain.extend(3, 7, 2, b"in", b"out")
    assert chain.head == chain_head(base, [e])
    for changed in (e.__class__(4, 7, 2, e.input_sha, e.output_sha), e.__class__(3, 8, 2, e.input_sha, e.output_sha),
                    e.__class__(3, 7, 1, e.input_sha, e.output_sha), e.__class__(3, 7, 2, e.output_sha, e.input_sha)):
        assert chain_head(base, [changed]) != chain.head


def test_signature_binds_peer_session_steps_and_head(ident: Identity, other: Identity) -> None:
    chain = CommitChain(MID, SPAN, "s1", ident.peer_id)
    chain.extend(0, 0, 1, b"a", b"b")
    c = sign_commit(ident, "s1", chain.seal())
    assert verify_commit_signature(ident.peer_id, "s1", c.steps, c.head, c.public_key, c.signature)
    assert not verify_commit_signature(ident.peer_id, "s2", c.steps, c.head, c.public_key, c.signature)
    assert not verify_commit_signature(ident.peer_id, "s1", c.steps + 1, c.head, c.public_key, c.signature)
    assert not verify_commit_signature(ident.peer_id, "s1", c.steps, os.urandom(32), c.public_key, c.signature)
    assert not verify_commit_signature(other.peer_id, "s1", c.steps, c.head, c.public_key, c.signature)
    assert not verify_commit_signature(ident.peer_id, "s1", c.steps, c.head, other.public_key, c.signature)


def test_client_log_accepts_an_honest_server(ident: Identity) -> None:
    log = CommitLog(MID, SPAN, "s1", ident.peer_id)
    for msg in _serve(ident, 10, every=4):
        log.record(decode_message(encode_message(msg)))  # through the wire
    assert log.broken is None
    assert log.signed is not None and log.signed.steps == 8
    assert [e.step_id for e in log.entries] == list(range(8))
    assert log.committed(7) is not None and log.committed(8) is None
    assert verify_chain(MID, SPAN, "s1", ident.peer_id, log.entries, log.signed) is None


def test_client_log_refuses_a_commit_to_other_outputs(ident: Identity) -> None:
    results = _serve(ident, 4, every=4)
    log = CommitLog(MID, SPAN, "s1", ident.peer_id)
    for msg in results[:3]:
        log.record(msg)
    last = results[3]
    log.record(StepResult(session_id="s1", step_id=3, hidden=_tensor(55), commit=last.commit))  # sent other bytes
    assert log.broken is not None and "output" in log.broken
    assert log.signed is None


def test_client_log_refuses_another_peers_signature(ident: Identity, other: Identity) -> None:
    forged = _serve(other, 4, every=4, session="s1")  # the right chain shape, signed by another key
    log = CommitLog(MID, SPAN, "s1", ident.peer_id)
    for msg in forged:
        log.record(msg)
    assert log.broken is not None and log.signed is None


def test_a_repeated_answer_is_not_a_new_result(ident: Identity) -> None:
    results = _serve(ident, 4, every=4)
    log = CommitLog(MID, SPAN, "s1", ident.peer_id)
    log.record(results[0])
    log.record(StepResult(session_id="s1", step_id=0, hidden=results[0].hidden))  # the server's REPEAT answer
    for msg in results[1:]:
        log.record(msg)
    assert log.broken is None and log.signed is not None and log.signed.steps == 4


def test_verify_chain_names_what_is_wrong(ident: Identity, other: Identity) -> None:
    log = CommitLog(MID, SPAN, "s1", ident.peer_id)
    for msg in _serve(ident, 4, every=4):
        log.record(msg)
    signed = log.signed
    assert signed is not None
    assert "entries" in (verify_chain(MID, SPAN, "s1", ident.peer_id, log.entries[:3], signed) or "")
    assert "head" in (verify_chain(MID, SPAN, "s1", ident.peer_id, log.entries[::-1], signed) or "")
    stolen = SignedCommit(signed.steps, signed.head, signed.signature, other.public_key)
    assert "signature" in (verify_chain(MID, SPAN, "s1", ident.peer_id, log.entries, stolen) or "")


def test_commit_is_bounded_on_the_wire(ident: Identity) -> None:
    msg = _serve(ident, 4, every=4)[3]
    assert isinstance(msg.commit, Commit)
    data = encode_message(msg)
    assert decode_message(data) == msg
    assert len(data) < 1200  # 4 entries, a 2048-bit signature and key


def test_push_mismatches_name_the_steps_whose_bytes_changed_between_hops(ident: Identity) -> None:
    from meshinfer.client.evidence import push_mismatches

    first = CommitChain(MID, BlockRange(0, 2), "a", ident.peer_id, every=3)
    second = CommitChain(MID, BlockRange(2, 4), "b", ident.peer_id, every=3)
    logs = CommitLog(MID, BlockRange(0, 2), "a", ident.peer_id), CommitLog(MID, BlockRange(2, 4), "b", ident.peer_id)
    for k in range(3):
        x, y, z = _tensor(k), _tensor(50 + k), _tensor(90 + k)
        pushed = _tensor(7) if k == 1 else y  # step 1: hop 2 claims it received other bytes than hop 1 returned
        for chain, log, inp, out, sid in ((first, logs[0], x, y, "a"), (second, logs[1], pushed, z, "b")):
            chain.extend(k, k, 1, inp.data, out.data)
            commit = sign_commit(ident, sid, chain.seal()) if chain.due else None
            log.record(StepResult(session_id=sid, step_id=k, hidden=out, commit=commit))
    assert push_mismatches(*logs) == [1]
