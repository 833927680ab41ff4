"""A private swarm's DHT: every DHT RPC (ping, store, find) carries a membership MAC, both ways.

Contract: ``SwarmAuthorizer`` plugs into hivemind's authorizer hook (``AuthorizerBase``: the ``auth`` fields its DHT
protobufs already carry, checked by ``AuthRPCWrapper`` around every RPC a node serves and makes). A request's
``auth.signature`` is ``SwarmKey.rpc_mac`` over the serialized request (its ``time`` and a fresh 16-byte ``nonce``
included, the signature blank); a servicer drops a request whose MAC fails, whose time is more than
``MAX_CLOCK_SKEW_S`` off, or whose nonce it saw recently (bounded memory). A response's signature is the MAC over the
serialized response carrying the request's nonce; a member ignores a response that fails it (hivemind then counts
that peer as not answering and drops it from its routing table). So a peer without the key gets no answer to any
DHT request and its answers are never believed: it cannot bootstrap from members, find nodes or values, or store
anything on them, and members never route through it. ``AllowListAuthorizer`` does the same for an allow-list swarm
with each peer's own key: the request carries the sender's public key (``client_access_token.public_key``) and its
RSA-PSS signature; the key must hash to a listed peer id; responses likewise (``service_access_token``). Knows
nothing of records, streams or sessions.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Any

# isort: split
from meshinfer.p2p import _hivemind_logging  # noqa: F401 - first: before hivemind is imported

# isort: split
from hivemind.utils.auth import AuthorizerBase

from meshinfer.p2p.allowlist import AllowList
from meshinfer.p2p.identity import Identity, peer_id_of_public_key, verify_signature
from meshinfer.p2p.membership import SwarmKey

MAX_CLOCK_SKEW_S = 120.0
"""A request stamped further than this from the servicer's clock is dropped (records already assume close clocks)."""
MAX_RECENT_NONCES = 65536
_REQUEST = b"request"
_RESPONSE = b"response"


class SwarmAuthorizer(AuthorizerBase):
    """Signs and checks hivemind DHT RPCs with a swarm key (see the module docstring)."""

    def __init__(self, key: SwarmKey, clock: Any = time.time) -> None:
        self._key = key
        self._clock = clock
        self._recent: OrderedDict[bytes, float] = OrderedDict()
        self.refused = 0
        """Requests and responses this node dropped (diagnostics)."""

    async def sign_request(self, request: Any, service_public_key: Any) -> None:
        auth = request.auth
        auth.time = self._clock()
        auth.nonce = secrets.token_bytes(16)
        auth.signature = b""
        auth.signature = self._key.rpc_mac(_REQUEST, request.SerializeToString())

    async def validate_request(self, request: Any) -> bool:
        auth = request.auth
        mac = bytes(auth.signature)
        auth.signature = b""
        ok = self._key.check_rpc_mac(mac, _REQUEST, request.SerializeToString())
        auth.signature = mac
        now = self._clock()
        if not ok or abs(auth.time - now) > MAX_CLOCK_SKEW_S or len(auth.nonce) != 16 or auth.nonce in self._recent:
            self.refused += 1
            return False
        while self._recent and (len(self._recent) >= MAX_RECENT_NONCES
                                or next(iter(self._recent.values())) < now - 2 * MAX_CLOCK_SKEW_S):
            self._recent.popitem(last=False)
        self._recent[bytes(auth.nonce)] = now
        return True

    async def sign_response(self, response: Any, request: Any) -> None:
        auth = response.auth
        auth.nonce = request.auth.nonce
        auth.signature = b""
        auth.signature = self._key.rpc_mac(_RESPONSE, response.SerializeToString())

    async def validate_response(self, response: Any, request: Any) -> bool:
        if response is None:
            return False
        auth = response.auth
        mac = bytes(auth.signature)
        auth.signature = b""
        ok = auth.nonce == request.auth.nonce and self._key.check_rpc_mac(mac, _RESPONSE, response.SerializeToString())
        auth.signature = mac
        if not ok:
            self.refused += 1
        return ok


class _Nonces:
    """Request nonces seen within twice the clock window (bounded): a replayed request is dropped."""

    def __init__(self) -> None:
        self._recent: OrderedDict[bytes, float] = OrderedDict()

    def fresh(self, nonce: bytes, stamped: float, now: float) -> bool:
        if abs(stamped - now) > MAX_CLOCK_SKEW_S or len(nonce) != 16 or nonce in self._recent:
            return False
        while self._recent and (len(self._recent) >= MAX_RECENT_NONCES
                                or next(iter(self._recent.values())) < now - 2 * MAX_CLOCK_SKEW_S):
            self._recent.popitem(last=False)
        self._recent[nonce] = now
        return True


class AllowListAuthorizer(AuthorizerBase):
    """Signs DHT RPCs with this peer's key and admits only those of listed peers (see the module docstring)."""

    def __init__(self, identity: Identity, allow: AllowList, clock: Any = time.time) -> None:
        self._identity = identity
        self._allow = allow
        self._clock = clock
        self._nonces = _Nonces()
        self.refused = 0

    def _signed_by_listed(self, message: Any, token: Any) -> bool:
        signature = bytes(token.signature)
        token.signature = b""
        data = message.SerializeToString()
        token.signature = signature
        try:
            peer = peer_id_of_public_key(bytes(token.public_key))
        except Exception:
            return False
        return self._allow.admits(peer) and verify_signature(bytes(token.public_key), data, signature)

    async def sign_request(self, request: Any, service_public_key: Any) -> None:
        auth = request.auth
        auth.time = self._clock()
        auth.nonce = secrets.token_bytes(16)
        auth.client_access_token.public_key = self._identity.public_key
        auth.client_access_token.signature = b""
        auth.client_access_token.signature = self._identity.sign(request.SerializeToString())

    async def validate_request(self, request: Any) -> bool:
        auth = request.auth
        ok = self._signed_by_listed(request, auth.client_access_token) and \
            self._nonces.fresh(bytes(auth.nonce), auth.time, self._clock())
        self.refused += not ok
        return ok

    async def sign_response(self, response: Any, request: Any) -> None:
        auth = response.auth
        auth.nonce = request.auth.nonce
        auth.service_access_token.public_key = self._identity.public_key
        auth.service_access_token.signature = b""
        auth.service_access_token.signature = self._identity.sign(response.SerializeToString())

    async def validate_response(self, response: Any, request: Any) -> bool:
        ok = response is not None and response.auth.nonce == request.auth.nonce and \
            self._signed_by_listed(response, response.auth.service_access_token)
        self.refused += not ok
        return ok
