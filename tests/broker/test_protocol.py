"""The frame codecs under property-based fuzzing: any bytes give a valid frame or FrameError.

The broker parses requests and encodes replies (broker.protocol); policyd's client encodes requests
and parses replies (policyd.brokerclient); whatever one side parses, the other encodes back to
the same bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol
from broker.protocol import (
    ErrorCode,
    FrameError,
    Reply,
    ReplyKind,
    Request,
    RequestFlag,
    RequestKind,
)
from policyd.brokerclient import MAX_REPLY, encode_request, parse_reply

FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))

paths = st.binary(min_size=1, max_size=protocol.MAX_PATH)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def valid_requests(draw: st.DrawFn) -> Request:
    kind = draw(st.sampled_from(list(RequestKind)))
    if kind == RequestKind.IDENTIFY:
        return Request(kind)
    if kind == RequestKind.LOOP_FILE:
        flags = draw(st.sampled_from([0, 1, 8, 9]))
        return Request(kind, RequestFlag(flags), draw(u32), path=draw(paths))
    flags = RequestFlag(draw(st.integers(0, 7)))
    major, minor = (draw(u32), draw(u32)) if flags & RequestFlag.EXPECT_DEV else (0, 0)
    seq = draw(u64) if flags & RequestFlag.EXPECT_DISKSEQ else 0
    return Request(kind, flags, 0, major, minor, seq, draw(paths))


@FUZZ
@given(st.binary(max_size=protocol.MAX_REQUEST + 64))
def test_parse_request_arbitrary_bytes(data: bytes) -> None:
    try:
        request = protocol.parse_request(data)
    except FrameError:
        return
    assert encode_request(request) == data  # what parses is canonical


@FUZZ
@given(valid_requests(), st.data())
def test_parse_request_mutated(request: Request, data: st.DataObject) -> None:
    frame = bytearray(encode_request(request))
    assert protocol.parse_request(bytes(frame)) == request
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    for candidate in (bytes(frame), bytes(frame[:cut])):
        try:
            parsed = protocol.parse_request(candidate)
        except FrameError:
            continue
        assert encode_request(parsed) == candidate


@FUZZ
@given(st.binary(max_size=MAX_REPLY + 64))
def test_parse_reply_arbitrary_bytes(data: bytes) -> None:
    try:
        reply = parse_reply(data)
    except FrameError:
        return
    assert protocol.encode_reply(reply) == data


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(list(ErrorCode)[1:]),
    st.integers(0, 2**31 - 1),
    st.text(max_size=400),
)
def test_error_reply_round_trip(code: ErrorCode, err: int, message: str) -> None:
    reply = parse_reply(protocol.encode_reply(Reply(ReplyKind.ERROR, code, err, message=message)))
    assert (reply.code, reply.errno) == (code, err)
    assert (
        message.encode()[: protocol.MAX_MESSAGE].decode("utf-8", "ignore").startswith(reply.message)
    )


def test_layout_is_fixed() -> None:
    assert protocol.REQUEST_HEADER.size == 28
    assert protocol.REPLY_HEADER.size == 52
    assert protocol.MAX_REQUEST == 28 + 4095
    assert MAX_REPLY == 52 + 255


def test_encode_refuses_what_parse_refuses() -> None:
    with pytest.raises(FrameError):
        encode_request(Request(RequestKind.LOOP_FILE, path=b""))
    with pytest.raises(FrameError):
        encode_request(Request(RequestKind.OPEN_BLOCK, path=b"/" * 5000))
    with pytest.raises(FrameError):
        encode_request(Request(RequestKind.IDENTIFY, path=b"/x"))
