"""OpenAI-format errors of the gateway, and the guards every ``/v1`` route passes first.

Contract: ``ApiError`` is an error answer in the OpenAI format (``body()``: ``{"error": {"message", "type",
"param", "code"}}``; the type follows from the status unless given); ``bad`` makes a 400 ``invalid_request_error``.
``check_api_key`` (401 unless no key is configured or ``Authorization: Bearer <key>`` matches, compared in constant
time) and ``check_model`` (404 ``model_not_found``) guard every route. ``error_for`` maps any exception raised
while serving to the ``ApiError`` to send: ``ContextOverflowError``/``ConfigError`` 400, ``NoRouteError``, an
``overloaded`` server or an unreachable swarm 503 (with the reason), anything else 500. Pure: no HTTP framework,
no torch, no network; knows nothing of request bodies, tokenizers or models.
"""

from __future__ import annotations

import hmac
from typing import Any

from meshinfer.client.routing import NoRouteError
from meshinfer.errors import ConfigError, ContextOverflowError, MeshinferError, RemoteError, TransportError


class ApiError(MeshinferError):
    """An error answer in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error" if status != 503 else "service_unavailable_error"
    return "invalid_request_error"


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Nothing when no key is configured or ``Authorization: Bearer <key>`` matches; else 401."""
    if api_key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


def check_model(requested: str, served: str) -> None:
    """404 ``model_not_found`` unless ``requested`` is the served model's name."""
    if requested != served:
        raise ApiError(404, f"the model {requested!r} does not exist; this gateway serves {served!r}",
                       param="model", code="model_not_found")


def error_for(err: BaseException) -> ApiError:
    """The OpenAI error answer for any exception raised while serving a request."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ContextOverflowError):
        return bad(str(err), code="context_length_exceeded")
    if isinstance(err, NoRouteError):
        return ApiError(503, f"the swarm cannot serve this model right now: {err}", code="no_route")
    if isinstance(err, RemoteError) and err.code == "overloaded":
        return ApiError(503, f"the swarm is overloaded right now: {err}", code="overloaded")
    if isinstance(err, TransportError):
        return ApiError(503, f"the swarm cannot be reached right now: {err}", code="swarm_unreachable")
    if isinstance(err, ConfigError):
        return bad(str(err))
    return ApiError(500, f"internal error: {type(err).__name__}: {err}")
