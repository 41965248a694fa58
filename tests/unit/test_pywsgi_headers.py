"""api/pywsgi.py's ``lean_headers`` reads any header block as gevent's own reader does (the email
parser): the same fields in the same order, the same status, the same exception, and the body left
where it was."""

from __future__ import annotations

import io
from http import client

import pytest
from gevent.pywsgi import headers_factory
from hypothesis import example, given, settings
from hypothesis import strategies as st

from api.pywsgi import lean_headers

BODY = b"\xff\xd8 the body, untouched\r\n\r\n"

# Names and values drawn to hit the parser's edges: spaces, tabs, colons, bare CR and LF, non-ASCII
# bytes, empty parts; lines folded, lines without a colon, "From " lines.
_chars = st.sampled_from([*b"aZ-_09 \t:\r\x7f\x80\xe9\xff!~/;", 0x0B])
_name = st.one_of(
    st.sampled_from([b"Host", b"Content-Type", b"content-length", b"X-Priority", b""]), st.binary(max_size=8)
)
_value = st.one_of(
    st.sampled_from([b"image/jpeg", b" 89000", b"\tkeep-alive ", b""]), st.lists(_chars, max_size=12).map(bytes)
)
_line = st.one_of(
    st.tuples(_name, _value, st.sampled_from([b"\r\n", b"\n"])).map(lambda t: t[0] + b":" + t[1] + t[2]),
    st.tuples(st.sampled_from([b" ", b"\t"]), _value).map(lambda t: t[0] + t[1] + b"\r\n"),  # folded
    _value.map(lambda v: v + b"\r\n"),  # no colon, most of the time
    st.just(b"From someone\r\n"),
)


def _both(raw: bytes) -> tuple[object, object]:
    out = []
    for read in (lean_headers, headers_factory):
        fp = io.BytesIO(raw)
        try:
            msg = read(fp)
            out.append((msg._headers, msg.status, list(msg.headers), fp.read()))
        except Exception as exc:  # the same exception either way
            out.append((type(exc), str(exc)))
    return out[0], out[1]


@settings(max_examples=600, deadline=None)
@given(st.lists(_line, max_size=6), st.sampled_from([b"\r\n", b"\n", b""]))
@example([b"X: a\rb\r\n", b"Y: 2\r\n"], b"\r\n")  # a bare CR ends a line for the email parser
@example([b"X: a\r\n", b" folded\r\n", b"Y: 2\n"], b"\n")
@example([b"From someone\r\n", b"Y: 2\r\n"], b"\r\n")
@example([b"Bad Name: 1\r\n", b"Y: 2\r\n"], b"\r\n")
@example([b"X:\t \tv \r\n", b":empty name\r\n"], b"\r\n")
def test_any_header_block_reads_as_gevents_own_reader_reads_it(lines: list[bytes], end: bytes) -> None:
    lean, theirs = _both(b"".join(lines) + end + (BODY if end else b""))
    assert lean == theirs


def test_a_plain_request_needs_no_email_parser_and_reads_the_same() -> None:
    raw = b"Host: api\r\nContent-Type: image/jpeg\r\nContent-Length: 12\r\nX-Empty:\r\nA:b:c\r\n\r\n" + BODY
    lean, theirs = _both(raw)
    assert lean == theirs
    msg = lean_headers(io.BytesIO(raw))
    assert msg.typeheader == "image/jpeg"
    assert msg.getheader("content-length") == "12"
    assert msg.get("a") == "b:c"


@pytest.mark.parametrize(
    "raw",
    [
        b"X: " + b"a" * (client._MAXLINE + 10) + b"\r\n\r\n",  # type: ignore[attr-defined]
        b"".join(b"X-%d: 1\r\n" % i for i in range(client._MAXHEADERS + 5)) + b"\r\n",  # type: ignore[attr-defined]
    ],
    ids=["line too long", "too many headers"],
)
def test_oversized_header_blocks_end_as_gevent_ends_them(raw: bytes) -> None:
    lean, theirs = _both(raw)
    assert lean == theirs
