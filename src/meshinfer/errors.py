"""The exception hierarchy of meshinfer.

Contract: every error a user can cause or meet derives from ``MeshinferError`` and carries a message
that is one clear line, fit to print without a traceback (the CLI does exactly that). Leaf module: it
imports nothing from meshinfer.
"""

from __future__ import annotations


class MeshinferError(Exception):
    """Base class. ``str(err)`` is a one-line, user-facing explanation."""


class ConfigError(MeshinferError):
    """A bad flag, option or configuration value (what the user gave is wrong; giving another value fixes it)."""


class UsageError(MeshinferError):
    """The API was used in a way its current state does not allow: a call on an object that is closed ("the
    session is closed", "the model is closed"), before what must come first ("call start() first"), or out of
    order. Not a bad value (that is ``ConfigError``) and not the network (``TransportError``): the calling code
    is what to fix."""


class UnsupportedModelError(MeshinferError):
    """The checkpoint's architecture or features are not supported."""


class CheckpointError(MeshinferError):
    """A checkpoint directory is missing files or tensors, or a file is truncated or corrupt."""


class ContextOverflowError(MeshinferError):
    """A prompt or generation does not fit the model's (or session's) context length."""


class WireError(MeshinferError):
    """A message or tensor on the wire is malformed, of an unknown version, or exceeds a limit."""


class LimitExceededError(WireError):
    """A message, tensor or request exceeds a configured limit (checked before allocation)."""


class TransportError(MeshinferError):
    """A peer could not be reached, a stream broke, or a read timed out."""


class PeerIdentityError(MeshinferError):
    """A peer key file is unusable, or the same identity is already running elsewhere."""


class RemoteError(MeshinferError):
    """A peer answered with a typed error. ``code`` is the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message
