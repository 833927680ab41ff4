"""Tensor codec: exact round trips, limits checked before allocation, only WireError on bad input."""

from __future__ import annotations

import msgspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import budget
from meshinfer.errors import LimitExceededError, WireError
from meshinfer.wire.limits import WireLimits
from meshinfer.wire.tensor import Tensor, check_tensor, decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (5, 16), (2, 3, 4), (0, 8)])
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape).to(dtype)
    t = encode_tensor(x)
    assert t.dtype == str(dtype).removeprefix("torch.") and t.shape == list(shape)
    assert len(t.data) == x.numel() * x.element_size()
    y = decode_tensor(t)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x, y)


def test_bytes_are_little_endian() -> None:
    t = encode_tensor(torch.tensor([[1.0]], dtype=torch.float32))
    assert t.data == b"\x00\x00\x80\x3f"


def test_encode_handles_views_and_refuses_other_dtypes() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2]  # non-contiguous view
    assert torch.equal(decode_tensor(encode_tensor(x)), x)
    with pytest.raises(WireError, match="int64"):
        encode_tensor(torch.arange(4))


def test_decoded_tensor_is_writable_and_independent() -> None:
    t = encode_tensor(torch.ones(2, 4))
    y = decode_tensor(t)
    y += 1  # no "non-writable buffer" trouble, and the message bytes are untouched
    assert torch.equal(decode_tensor(t), torch.ones(2, 4))


SMALL = WireLimits(max_tokens_per_step=4, max_hidden_size=8, max_tensor_bytes=64)


@pytest.mark.parametrize(("tensor", "error"), [
    (Tensor("float64", [1, 2], b"\0" * 16), "unsupported tensor dtype"),
    (Tensor("float32", [], b""), "rank"),
    (Tensor("float32", [1, 1, 1, 1], b"\0" * 4), "rank"),
    (Tensor("float32", [1, 9], b"\0" * 36), "max hidden size"),
    (Tensor("float32", [5, 2], b"\0" * 40), "max tokens"),
    (Tensor("float32", [3, 2, 2], b"\0" * 48), "max tokens"),
    (Tensor("float32", [4, 8], b"\0" * 128), "exceeds the limit of 64"),
    (Tensor("float32", [1, 2], b"\0" * 7), "needs 8"),
])
def test_limits_are_checked(tensor: Tensor, error: str) -> None:
    with pytest.raises(WireError, match=error):
        decode_tensor(tensor, SMALL)


def test_huge_shape_is_refused_without_allocating() -> None:
    # 2^31 x 2^31 elements with 4 bytes of data: must fail on the limit check, not in torch.
    t = Tensor("float32", [2**31 - 1, 2**31 - 1], b"\0" * 4)
    with pytest.raises(LimitExceededError):
        check_tensor(t)
    with pytest.raises(LimitExceededError):
        decode_tensor(t)


_any_tensor = st.builds(
    Tensor,
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "int8", "", "float32\0"]),
    shape=st.lists(st.integers(0, 2**31 - 1) | st.integers(0, 10), max_size=5),
    data=st.binary(max_size=256),
)


@budget(300)
@given(_any_tensor)
def test_fuzz_decode_tensor_only_raises_wire_errors(t: Tensor) -> None:
    try:
        y = decode_tensor(t, SMALL)
    except WireError:
        return
    assert list(y.shape) == t.shape and y.numel() * y.element_size() == len(t.data)


@budget(300)
@given(st.binary(max_size=512))
def test_fuzz_tensor_struct_from_random_bytes(data: bytes) -> None:
    try:
        t = msgspec.msgpack.decode(data, type=Tensor)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    try:
        decode_tensor(t, SMALL)
    except WireError:
        pass


@budget(200)
@given(tokens=st.integers(0, 40), hidden=st.integers(1, 20), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       declared=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=3))
def test_fuzz_steps_under_a_models_limits(tokens: int, hidden: int, dtype: str, declared: list[int]) -> None:
    """A server's model-sized limits: every legitimate Step decodes bit-exactly, and a Step declaring any
    other shape for its bytes (oversized ones included) is refused with a WireError before allocating."""
    from meshinfer.wire.limits import limits_for_model
    from meshinfer.wire.messages import Step, decode_message, encode_message

    limits = limits_for_model(16, 8)
    x = torch.randn(tokens, hidden).to(getattr(torch, dtype))
    step = Step(session_id="s", step_id=1, position=0, hidden=encode_tensor(x))
    try:
        got = decode_tensor(decode_message(encode_message(step), limits).hidden, limits)  # type: ignore[union-attr]
    except LimitExceededError:
        assert x.numel() * x.element_size() > limits.max_tensor_bytes
    else:
        assert x.numel() * x.element_size() <= limits.max_tensor_bytes and torch.equal(got, x)
    forged = Tensor(dtype, declared, step.hidden.data)
    try:
        y = decode_tensor(forged, limits)
    except WireError:
        return
    assert list(y.shape) == declared and y.numel() * y.element_size() == len(step.hidden.data)
