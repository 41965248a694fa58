"""Frames: round trips, and every way a frame can be wrong is a FrameError, never a crash."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import DeadlineExceeded, FrameError, QueueFull, error_from_wire
from common.protocol import (
    VERSION,
    Reply,
    Request,
    TensorData,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)


def _request(**over: object) -> Request:
    base = dict(
        id="abc123",
        model="resnet18",
        deadline_ms=1_900_000_000_000,
        input=TensorData("uint8", (2, 2, 3), bytes(range(12))),
        params={"topk": 3},
        sent_ms=1_800_000_000_000,
    )
    base.update(over)
    return Request(**base)  # type: ignore[arg-type]


def _packed(**fields: object) -> bytes:
    frame = {
        "v": VERSION,
        "id": "abc123",
        "model": "m",
        "deadline_ms": 1,
        "input": {"dtype": "uint8", "shape": [1, 1, 3], "data": b"abc"},
        "params": {},
    }
    frame.update(fields)
    return msgpack.packb(frame, use_bin_type=True)


def test_request_round_trip() -> None:
    req = _request()
    assert decode_request(encode_request(req)) == req


def test_reply_round_trips() -> None:
    ok = Reply("abc", True, result={"indices": [1], "scores": [0.5]}, meta={"batch_size": 4})
    assert decode_reply(encode_reply(ok)) == ok
    bad = Reply.failure("abc", DeadlineExceeded("late"))
    back = decode_reply(encode_reply(bad))
    assert not back.ok and back.error == {"code": "deadline_exceeded", "message": "late"}


def test_unknown_version_is_rejected_but_keeps_the_reply_address() -> None:
    with pytest.raises(FrameError) as info:
        decode_request(_packed(v=99))
    assert info.value.request_id == "abc123"
    assert "version" in info.value.message


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2, 3]), msgpack.packb("text")],
)
def test_malformed_bytes_are_rejected_without_an_address(raw: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode_request(raw)
    assert info.value.request_id is None


@pytest.mark.parametrize(
    "fields",
    [
        {"input": {"dtype": "uint8", "shape": [2, 2, 3], "data": b"short"}},
        {"input": {"dtype": "complex128", "shape": [1], "data": b"x" * 16}},
        {"input": {"dtype": "uint8", "shape": [-1, 3], "data": b""}},
        {"input": "not a map"},
        {"deadline_ms": "soon"},
        {"params": [1, 2]},
        {"model": None},
    ],
)
def test_wrong_fields_are_rejected_with_the_address(fields: dict[str, object]) -> None:
    with pytest.raises(FrameError) as info:
        decode_request(_packed(**fields))
    assert info.value.request_id == "abc123"


def test_an_id_that_is_not_a_safe_key_part_gives_no_address() -> None:
    with pytest.raises(FrameError) as info:
        decode_request(_packed(id="../../etc" + "x" * 80))
    assert info.value.request_id is None


def test_errors_keep_their_code_and_status_across_the_wire() -> None:
    err = error_from_wire(**QueueFull("busy").to_wire())
    assert isinstance(err, QueueFull) and err.status == 503 and err.message == "busy"
    assert error_from_wire("something_new", "x").status == 500


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_only_ever_raise_frame_error(raw: bytes) -> None:
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(FrameError):
            decode(raw)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "id", "model", "deadline_ms", "input", "params", "ok"]), _values))
def test_fuzz_structured_maps_only_ever_raise_frame_error(frame: dict[str, object]) -> None:
    raw = msgpack.packb(frame, use_bin_type=True)
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(FrameError):
            decode(raw)
