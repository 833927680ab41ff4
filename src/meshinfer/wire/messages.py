"""Typed, versioned messages of a session stream (DESIGN.md section 4).

Contract: every message is a frozen msgspec Struct in the tagged union ``Message`` (tag field
``type``) and carries ``v`` = ``PROTOCOL_VERSION``. ``encode_message`` gives msgpack bytes;
``decode_message`` turns arbitrary bytes into a ``Message`` or raises ``WireError`` (subclasses:
``LimitExceededError``, ``wire.codec.VersionMismatchError``) and nothing else (through ``wire.codec``); it
also checks every tensor the message carries against ``WireLimits`` (no allocation beyond the bytes already
received). ``ErrorCode`` is the closed set of ``Error.code`` values; ``error_code_for`` maps such an exception
to the one to send back. This module knows nothing about streams, peers or models; it never pickles.

A session, as seen by a server::

    client -> Open(session_id, model, span, max_length, dtype, route_tail, prev_peer?)   server -> Opened
    client -> Step(session_id, step_id, position, hidden[tokens, hidden])   server -> StepResult
        (with a route tail, the server pushes its StepResult to route_tail[0] instead; a server takes pushed
        steps only from the session's client or the ``prev_peer`` it named)
        (Step and StepResult may carry a ``Burst`` hint: one of N messages sent at once; ``wire.burst``)
    client -> Close(session_id)
    anything wrong -> Error(code, message, session_id?, step_id?)
"""

from __future__ import annotations

import enum
from typing import Annotated, Final

import msgspec

from meshinfer.errors import LimitExceededError, WireError
from meshinfer.types import DTYPES, BlockRange
from meshinfer.wire.codec import Codec, failure_code, mismatch
from meshinfer.wire.limits import DEFAULT_LIMITS, WireLimits
from meshinfer.wire.tensor import Tensor, check_tensor

PROTOCOL_VERSION: Final = 1


class ErrorCode(enum.StrEnum):
    """The closed set of ``Error.code`` values (their plain string values on the wire)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_MODEL = "unknown_model"
    SPAN_NOT_SERVED = "span_not_served"
    UNKNOWN_SESSION = "unknown_session"
    LIMIT_EXCEEDED = "limit_exceeded"
    OVERLOADED = "overloaded"
    VERSION_MISMATCH = "version_mismatch"
    TIMEOUT = "timeout"
    NEXT_HOP_FAILED = "next_hop_failed"
    INTERNAL = "internal"


ERROR_CODES: Final = frozenset(code.value for code in ErrorCode)
"""Every ``Error.code`` value as a plain string (a received code is a ``str``, not an ``ErrorCode``)."""


SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
PeerIdText = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
Maddr = Annotated[str, msgspec.Meta(max_length=512)]


class _Base(msgspec.Struct, frozen=True, tag_field="type", omit_defaults=False):
    pass


class Hop(msgspec.Struct, frozen=True):
    """One next server of a route: who it is, which blocks it runs, where to reach it (optional)."""

    peer_id: PeerIdText
    span: BlockRange
    session_id: SessionId
    """The session the client opened on that server; pushed steps are addressed to it."""
    maddrs: Annotated[list[Maddr], msgspec.Meta(max_length=16)] = []
    direct: Annotated[list[Maddr], msgspec.Meta(max_length=8)] = []
    """The server's direct-plane addresses (faster than libp2p; ``maddrs`` stay the fallback)."""


MAX_BURST: Final = 4096
"""Largest ``Burst.size`` accepted (a sender's turn never carries more steps than that)."""


class Burst(msgspec.Struct, frozen=True):
    """A hint that this message is one of ``size`` messages one sender sends to one receiver at once (the
    outputs of one batched turn, or the next steps of one batched LM-head call), all tagged with the same
    ``id``. A receiver may hold the members that arrived (briefly: ``wire.burst.BURST_HOLD_S``) until the
    whole burst is in, so they are computed as one batch and move on together. Optional: an absent or
    wrong hint only costs speed, never correctness."""

    id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    size: Annotated[int, msgspec.Meta(ge=2, le=MAX_BURST)]


class Open(_Base, frozen=True, tag="open"):
    session_id: SessionId
    model: Name
    span: BlockRange
    max_length: Positive
    dtype: str
    route_tail: Annotated[list[Hop], msgspec.Meta(max_length=256)] = []
    v: int = PROTOCOL_VERSION
    quant: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    """The weights' quant mode the client planned its route with; a server running another mode refuses
    (its outputs would differ from the rest of the route's). None: any (older clients)."""
    prev_peer: PeerIdText | None = None
    """The previous hop's server: the one peer besides the client allowed to push steps into this session
    (``meshinfer/push/1``). None: only the client (the first hop, or a route without pushes)."""


class Opened(_Base, frozen=True, tag="opened"):
    session_id: SessionId
    span: BlockRange
    max_length: Positive
    v: int = PROTOCOL_VERSION


class _StepOf(_Base, frozen=True):
    """What a step and its result both start with: which step of which session (fields in wire order)."""

    session_id: SessionId
    step_id: NonNegative


class Step(_StepOf, frozen=True, tag="step"):
    position: NonNegative
    hidden: Tensor
    v: int = PROTOCOL_VERSION
    burst: Burst | None = None
    want_commit: bool = False
    """Ask for a signed ``Commit`` on this step's result (and on the next hops', pushes pass it on) even before
    ``COMMIT_EVERY`` results (issue 19: an audit judging the latest positions). Older servers ignore it."""


COMMIT_EVERY: Final = 16
"""A server attaches a signed ``Commit`` to every COMMIT_EVERY-th ``StepResult`` of a session (``p2p.commit``)."""
MAX_COMMIT_ENTRIES: Final = 64
"""Most chain entries one ``Commit`` carries (the steps since the previous commit)."""
Sha256 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class ChainEntry(msgspec.Struct, frozen=True, array_like=True):
    """One step of a server's commitment chain (``p2p.commit``): which step, where, how many tokens, and the
    sha256 of the input and output tensors' wire bytes (``Tensor.data``)."""

    step_id: NonNegative
    position: NonNegative
    tokens: Positive
    input_sha: Sha256
    output_sha: Sha256


class Commit(msgspec.Struct, frozen=True):
    """A server's signed commitment to the first ``steps`` results of a session (``p2p.commit``): the chain head
    after them, its RSA signature by the server's peer key (``public_key``, whose hash is its peer id), and the
    chain entries since the previous commit (so the client learns the input hashes the server claims)."""

    steps: Positive
    head: Sha256
    signature: Annotated[bytes, msgspec.Meta(max_length=1024)]
    public_key: Annotated[bytes, msgspec.Meta(max_length=1024)]
    entries: Annotated[list[ChainEntry], msgspec.Meta(max_length=MAX_COMMIT_ENTRIES)] = []


class StepResult(_StepOf, frozen=True, tag="step_result"):
    hidden: Tensor
    v: int = PROTOCOL_VERSION
    burst: Burst | None = None
    commit: Commit | None = None
    """A signed commitment to this session's results so far (every ``COMMIT_EVERY`` steps; older servers: None,
    and older clients ignore it)."""


class Retarget(_Base, frozen=True, tag="retarget"):
    """Point a session's pushes at another next hop (``route_tail``; empty: push nowhere). A client sends
    it after replacing a failed server of its route; the session's later outputs go to the new hop."""

    session_id: SessionId
    route_tail: Annotated[list[Hop], msgspec.Meta(max_length=256)] = []
    v: int = PROTOCOL_VERSION
    prev_peer: PeerIdText | None = None
    """When set, the peer allowed to push into this session from now on, instead of the one named at ``Open``
    (the previous hop was replaced). None: unchanged."""


class Close(_Base, frozen=True, tag="close"):
    session_id: SessionId
    v: int = PROTOCOL_VERSION


class Error(_Base, frozen=True, tag="error"):
    code: Annotated[str, msgspec.Meta(max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=4096)]
    session_id: SessionId | None = None
    step_id: NonNegative | None = None
    v: int = PROTOCOL_VERSION


class Ping(_Base, frozen=True, tag="ping"):
    seq: NonNegative
    payload: bytes = b""
    v: int = PROTOCOL_VERSION


class Pong(_Base, frozen=True, tag="pong"):
    seq: NonNegative
    payload: bytes = b""
    v: int = PROTOCOL_VERSION


Message = Open | Opened | Step | StepResult | Retarget | Close | Error | Ping | Pong
MESSAGE_TYPES: Final = (Open, Opened, Step, StepResult, Retarget, Close, Error, Ping, Pong)


def _check(msg: Message, limits: WireLimits) -> None:
    if isinstance(msg, Step | StepResult):
        check_tensor(msg.hidden, limits)
    elif isinstance(msg, Open | Retarget):
        if isinstance(msg, Open) and msg.dtype not in DTYPES:
            raise WireError(f"unsupported dtype {msg.dtype[:32]!r}; expected one of {', '.join(DTYPES)}")
        if len(msg.route_tail) > limits.max_route_hops:
            raise LimitExceededError(
                f"route tail of {len(msg.route_tail)} hops exceeds {limits.max_route_hops}"
            )
    elif isinstance(msg, Ping | Pong) and len(msg.payload) > limits.max_tensor_bytes:
        raise LimitExceededError(
            f"ping payload of {len(msg.payload)} bytes exceeds {limits.max_tensor_bytes}"
        )


_codec: Codec[Message] = Codec(
    Message, MESSAGE_TYPES, version=PROTOCOL_VERSION, kind="wire message", label="message",
    version_error=mismatch("", PROTOCOL_VERSION), probe_version=True, check=_check,
)


def encode_message(msg: Message) -> bytes:
    """msgpack bytes of ``msg`` (a member of ``Message``)."""
    return _codec.encode(msg)


def decode_message(data: bytes | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Decode and validate one message; raise WireError (or a subclass) for anything malformed."""
    return _codec.decode(data, limits)


def error_code_for(err: BaseException) -> ErrorCode:
    """The ``Error.code`` that reports ``err`` to the peer that caused it."""
    return ErrorCode(failure_code(err))


def error_message(err: BaseException, *, session_id: str | None = None, step_id: int | None = None) -> Error:
    """An ``Error`` message reporting ``err`` (message text clipped to the wire limit)."""
    text = str(err) or type(err).__name__
    return Error(code=error_code_for(err), message=text[:4096], session_id=session_id, step_id=step_id)
