"""The wire protocol: typed versioned messages, the tensor codec, frames and DHT record schemas.

Contract: pure encoding and validation (msgspec, lazily torch for tensors); no I/O, no network,
nothing pickled. Decoding untrusted bytes raises only ``WireError`` and its subclasses. Modules (import
from them; this package re-exports nothing): ``codec`` (``Codec``: the one typed encode/decode with
limits that the three protocols below share), ``messages`` (session stream messages), ``pieces``
(weight-piece messages), ``records`` (DHT payloads and keys), ``tensor`` (tensor codec), ``framing``
(frames and chunks), ``burst`` (burst hints), ``limits`` (``WireLimits``), ``sealed`` (sealed-request and relay
messages) and ``sealing`` (their cryptography: HPKE from ``cryptography``, sealed frames, the replay memory).
"""
