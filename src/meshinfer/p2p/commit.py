"""Signed commitments: the hash chain a server keeps per session, its signatures, and the client's log of them.

Contract (issue 19, shared design D4). For one session a server keeps a hash chain over the results it sends::

    head_0 = sha256(msgpack(["meshinfer-commit-v1", model_id, span.start, span.end, session_id, peer_id]))
    head_k = sha256(head_{k-1} | step_id u64 | position u64 | tokens u64 | sha256(input wire bytes)
                    | sha256(output wire bytes))

(big-endian integers; "wire bytes" are ``Tensor.data``, the same bytes on both ends of a stream and of a push).
Every ``COMMIT_EVERY`` results it signs ``msgpack(["meshinfer-commit-sig-v1", peer_id, session_id, k, head_k])``
with its peer key (``Identity.sign``, RSA-PSS) and attaches ``Commit(steps=k, head, signature, public_key,
entries since the last commit)`` to that ``StepResult``. A signed commit binds the server to every output it
claimed for the session so far: it cannot disown one later (the point of ``client.reports``).

``CommitChain`` is the server's side (``extend`` per result, ``seal`` + ``sign_commit`` when ``due``; signing may
run off the event loop). ``CommitLog`` is the client's side for one hop: ``record`` every ``StepResult`` read from
that hop (it hashes the output bytes itself), and a commit is believed only if its entries name exactly the
results received, in order, the chain recomputes to its head, the key hashes to the hop's peer id and the
signature verifies; otherwise ``CommitLog.broken`` says why (the server signed something it did not send).
``verify_chain`` is the same check for a whole chain (report verification). Pure apart from RSA and sha256: no
I/O, no torch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from meshinfer.p2p.identity import Identity, peer_id_of_public_key, verify_signature
from meshinfer.types import BlockRange
from meshinfer.wire.messages import COMMIT_EVERY, MAX_COMMIT_ENTRIES, ChainEntry, Commit, StepResult

CHAIN_DOMAIN = b"meshinfer-commit-v1"
SIG_DOMAIN = b"meshinfer-commit-sig-v1"
_encoder = msgspec.msgpack.Encoder()
_U64x3 = struct.Struct(">QQQ")

__all__ = ["COMMIT_EVERY", "CommitChain", "CommitLog", "SignedCommit", "chain_head", "chain_step", "genesis",
           "sha256", "signed_bytes", "verify_chain", "verify_commit_signature"]


def sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def genesis(model_id: str, span: BlockRange, session_id: str, peer_id: str) -> bytes:
    """head_0 of the chain of one session on one server."""
    return sha256(_encoder.encode([CHAIN_DOMAIN, model_id, span.start, span.end, session_id, peer_id]))


def chain_step(head: bytes, entry: ChainEntry) -> bytes:
    """head_k from head_{k-1} and the k-th entry."""
    return sha256(head + _U64x3.pack(entry.step_id, entry.position, entry.tokens) + entry.input_sha
                  + entry.output_sha)


def chain_head(head: bytes, entries: Sequence[ChainEntry]) -> bytes:
    for entry in entries:
        head = chain_step(head, entry)
    return head


def signed_bytes(peer_id: str, session_id: str, steps: int, head: bytes) -> bytes:
    """The exact bytes a commit signature covers."""
    return _encoder.encode([SIG_DOMAIN, peer_id, session_id, steps, head])


def verify_commit_signature(peer_id: str, session_id: str, steps: int, head: bytes, public_key: bytes,
                            signature: bytes) -> bool:
    """Whether ``public_key`` is ``peer_id``'s and signed (session, steps, head)."""
    return (peer_id_of_public_key(public_key) == peer_id
            and verify_signature(public_key, signed_bytes(peer_id, session_id, steps, head), signature))


@dataclass(frozen=True)
class SignedCommit:
    """A verified commitment: ``steps`` results, chain ``head``, the signature and the signer's public key."""

    steps: int
    head: bytes
    signature: bytes
    public_key: bytes


def verify_chain(model_id: str, span: BlockRange, session_id: str, peer_id: str, entries: Sequence[ChainEntry],
                 commit: SignedCommit) -> str | None:
    """None when ``entries`` are the first ``commit.steps`` entries of ``peer_id``'s chain for the session and
    ``commit`` is its valid signature; else why not."""
    if len(entries) != commit.steps:
        return f"{len(entries)} chain entries for a commit of {commit.steps} steps"
    if chain_head(genesis(model_id, span, session_id, peer_id), entries) != commit.head:
        return "the chain entries do not hash to the signed head"
    if not verify_commit_signature(peer_id, session_id, commit.steps, commit.head, commit.public_key,
                                   commit.signature):
        return "the commit signature is not the accused peer's"
    return None


class CommitChain:
    """A server's chain for one session (see the module docstring)."""

    def __init__(self, model_id: str, span: BlockRange, session_id: str, peer_id: str,
                 every: int = COMMIT_EVERY) -> None:
        self.session_id = session_id
        self.peer_id = peer_id
        self.head = genesis(model_id, span, session_id, peer_id)
        self.steps = 0
        self.every = max(1, min(every, MAX_COMMIT_ENTRIES))
        self.pending: list[ChainEntry] = []
        """Entries since the last commit."""

    def extend(self, step_id: int, position: int, tokens: int, input_data: bytes, output_data: bytes) -> ChainEntry:
        entry = ChainEntry(step_id, position, tokens, sha256(input_data), sha256(output_data))
        self.head = chain_step(self.head, entry)
        self.steps += 1
        self.pending.append(entry)
        return entry

    @property
    def due(self) -> bool:
        """Whether the result just chained must carry a commit."""
        return len(self.pending) >= self.every

    def seal(self) -> tuple[int, bytes, list[ChainEntry]]:
        """(steps, head, entries since the last commit) to sign now; starts a new batch of entries."""
        entries, self.pending = self.pending, []
        return self.steps, self.head, entries


def sign_commit(identity: Identity, session_id: str, sealed: tuple[int, bytes, list[ChainEntry]]) -> Commit:
    """The ``Commit`` for ``CommitChain.seal()``'s output (the RSA signature: ~1-2 ms; may run in a thread)."""
    steps, head, entries = sealed
    return Commit(steps=steps, head=head, signature=identity.sign(signed_bytes(identity.peer_id, session_id, steps,
                                                                               head)),
                  public_key=identity.public_key, entries=entries)


@dataclass
class CommitLog:
    """The client's record of one hop's results and of its latest verified commit (see the module docstring)."""

    model_id: str
    span: BlockRange
    session_id: str
    peer_id: str
    received: list[tuple[int, bytes]] = field(default_factory=list)
    """(step id, sha256 of the output wire bytes) of every result read from the hop, in order."""
    entries: list[ChainEntry] = field(default_factory=list)
    """The hop's chain entries covered by ``signed`` (verified)."""
    signed: SignedCommit | None = None
    broken: str | None = None
    """Why a commit of this hop was refused (then nothing later is believed)."""
    head: bytes = b""
    _index: dict[int, int] = field(default_factory=dict[int, int])

    def __post_init__(self) -> None:
        self.head = genesis(self.model_id, self.span, self.session_id, self.peer_id)

    def record(self, msg: StepResult) -> None:
        """Log one ``StepResult`` read from the hop (a repeated answer to the last step id is not a new result)."""
        if self.received and self.received[-1][0] == msg.step_id:
            return
        self.received.append((msg.step_id, sha256(msg.hidden.data)))
        if msg.commit is not None and self.broken is None:
            self.broken = self._accept(msg.commit)

    def _accept(self, commit: Commit) -> str | None:
        done = len(self.entries)
        new = commit.entries
        if commit.steps != done + len(new) or commit.steps > len(self.received):
            return f"commit of {commit.steps} steps after {done} with {len(new)} entries, {len(self.received)} read"
        for entry, (step_id, out_sha) in zip(new, self.received[done:commit.steps], strict=True):
            if entry.step_id != step_id or entry.output_sha != out_sha:
                return f"the commit names output {entry.output_sha.hex()[:12]} for step {entry.step_id}, not the " \
                       f"one received for step {step_id}"
        head = chain_head(self.head, new)
        if head != commit.head:
            return "the commit's entries do not hash to its head"
        if not verify_commit_signature(self.peer_id, self.session_id, commit.steps, head, commit.public_key,
                                       commit.signature):
            return "the commit's signature or key is not the hop's"
        for entry in new:
            self._index[entry.step_id] = len(self.entries)
            self.entries.append(entry)
        self.head = head
        self.signed = SignedCommit(commit.steps, head, commit.signature, commit.public_key)
        return None

    def committed(self, step_id: int) -> ChainEntry | None:
        """The verified entry of ``step_id`` (None: not covered by a signed commit yet)."""
        k = self._index.get(step_id)
        return None if k is None else self.entries[k]

    def index(self, step_id: int) -> int | None:
        """The chain index of ``step_id``'s verified entry (None: not committed yet)."""
        return self._index.get(step_id)
