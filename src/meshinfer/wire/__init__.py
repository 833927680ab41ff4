"""The wire protocol: typed versioned messages, the tensor codec, frames and DHT record schemas.

Contract: pure encoding and validation (msgspec, lazily torch for tensors); no I/O, no network,
nothing pickled. Decoding untrusted bytes raises only ``WireError`` and its subclasses. Modules:
``messages`` (session stream messages), ``tensor`` (tensor codec), ``framing`` (frames and chunks),
``records`` (DHT payloads and keys), ``limits`` (``WireLimits``).
"""

from meshinfer.wire.limits import CHUNK_BYTES, DEFAULT_LIMITS, WireLimits
from meshinfer.wire.messages import (
    PROTOCOL_VERSION,
    Close,
    Error,
    ErrorCode,
    Hop,
    Message,
    Open,
    Opened,
    Ping,
    Pong,
    Step,
    StepResult,
    VersionMismatchError,
    decode_message,
    encode_message,
    error_code_for,
    error_message,
)
from meshinfer.wire.records import (
    MODELS_KEY,
    RECORD_VERSION,
    DhtRecord,
    ModelCard,
    ServerRecord,
    block_key,
    decode_record,
    encode_record,
    model_key,
)
from meshinfer.wire.tensor import Tensor, check_tensor, decode_tensor, encode_tensor

__all__ = [
    "CHUNK_BYTES", "DEFAULT_LIMITS", "MODELS_KEY", "PROTOCOL_VERSION", "RECORD_VERSION", "Close",
    "DhtRecord", "Error", "ErrorCode", "Hop", "Message", "ModelCard", "Open", "Opened", "Ping", "Pong",
    "ServerRecord", "Step", "StepResult", "Tensor", "VersionMismatchError", "WireLimits", "block_key",
    "check_tensor", "decode_message", "decode_record", "decode_tensor", "encode_message",
    "encode_record", "encode_tensor", "error_code_for", "error_message", "model_key",
]
