"""One typed codec for every protocol on the wire: a tagged union of msgspec Structs, versioned, with limits.

Contract: ``Codec(union, members, ...)`` encodes a member of ``union`` to msgpack bytes (anything else:
``WireError``) and decodes untrusted bytes into one, raising only ``WireError`` and its subclasses: a decoding
failure becomes ``VersionMismatchError`` when the bytes name another ``version`` (``probe_version``), a
``LimitExceededError`` when msgspec refused a length bound of the schema (``length_limits``), else a
``WireError`` "malformed <label>: ..."; a decoded value of another version raises ``version_error(v)``; then
``check(value, limits)`` runs the protocol's own checks (e.g. tensors against ``WireLimits``). Limits that are
part of the schema (``msgspec.Meta``) are enforced while decoding, so nothing beyond the received bytes is
allocated. ``failure_code`` classifies an exception into the error code both protocols share
(``version_mismatch``, ``limit_exceeded``, ``bad_request``, ``internal``). The session messages
(``wire.messages``), the weight-piece messages (``wire.pieces``) and the DHT records (``wire.records``) are
three instances; their bytes are exactly msgspec's encoding of the Structs. Pure: no I/O, never pickles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from meshinfer.errors import LimitExceededError, MeshinferError, WireError
from meshinfer.wire.limits import DEFAULT_LIMITS, WireLimits


class VersionMismatchError(WireError):
    """The peer speaks another protocol version."""


class Versioned(Protocol):
    @property
    def v(self) -> int: ...


M = TypeVar("M", bound=Versioned)

_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, MeshinferError, ValueError, TypeError, OverflowError,
                  RecursionError)


class _VersionProbe(msgspec.Struct):
    v: int | None = None


_probe = msgspec.msgpack.Decoder(_VersionProbe)


def mismatch(protocol: str, version: int) -> Callable[[int], WireError]:
    """The ``version_error`` of a protocol that names its version mismatches (``protocol``: "" or "pieces ")."""
    return lambda v: VersionMismatchError(f"peer speaks {protocol}protocol version {v}, this peer speaks {version}")


class Codec(Generic[M]):
    """Encode and decode one tagged union of versioned msgspec Structs (see the module docstring)."""

    def __init__(self, union: Any, members: tuple[type, ...], *, version: int, kind: str, label: str,
                 version_error: Callable[[int], WireError], probe_version: bool = False,
                 length_limits: bool = False, check: Callable[[M, WireLimits], None] | None = None) -> None:
        self.members = members
        self.version = version
        self.kind = kind
        """What a value is, for "not a <kind>" (encoding something else)."""
        self.label = label
        """What the bytes should have been, for "malformed <label>"."""
        self.version_error = version_error
        self.probe_version = probe_version
        self.length_limits = length_limits
        self.check = check
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(union)

    def encode(self, value: M) -> bytes:
        """msgpack bytes of ``value`` (a member of the union)."""
        if not isinstance(value, self.members):
            raise WireError(f"not a {self.kind}: {type(value).__name__}")
        return self._encoder.encode(value)

    def decode(self, data: bytes | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> M:
        """Decode and validate one value; raise WireError (or a subclass) for anything malformed."""
        try:
            value = self._decoder.decode(data)
        except _DECODE_ERRORS as err:
            raise self._failure(data, err) from None
        if value.v != self.version:
            raise self.version_error(value.v)
        if self.check is not None:
            self.check(value, limits)
        return value

    def _failure(self, data: bytes | memoryview, err: Exception) -> WireError:
        text = str(err)
        if self.probe_version:
            try:
                version = _probe.decode(data).v
            except Exception:
                version = None
            if version is not None and version != self.version:
                return self.version_error(version)
        if self.length_limits and "length" in text and "<=" in text:
            return LimitExceededError(f"{self.label} over a size limit: {text[:200]}")
        return WireError(f"malformed {self.label}: {text[:200]}")


def failure_code(err: BaseException) -> str:
    """The error code reporting ``err`` to the peer that caused it: ``version_mismatch``, ``limit_exceeded``,
    ``bad_request`` (any other ``WireError``) or ``internal``."""
    if isinstance(err, VersionMismatchError):
        return "version_mismatch"
    if isinstance(err, LimitExceededError):
        return "limit_exceeded"
    if isinstance(err, WireError):
        return "bad_request"
    return "internal"
