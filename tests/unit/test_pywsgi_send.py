"""api/pywsgi.py's handler sends a small answer's status line, headers and body in one send, byte
for byte what gevent's own handler sends in two; a large one as gevent does."""

from __future__ import annotations

import io
from typing import Any

import pytest
from gunicorn.workers.ggevent import PyWSGIHandler

from api.pywsgi import ONE_SEND_MAX, _TimedHandler


class _Socket:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[bytes] = []
        self.fail = fail

    def sendall(self, data: bytes) -> None:
        if self.fail:
            raise ConnectionResetError("the client went away")
        self.sent.append(bytes(data))


def _answer(handler_class: type[Any], headers: list[tuple[str, str]], chunks: list[bytes], fail: bool = False) -> Any:
    sock = _Socket(fail)
    h = handler_class(sock, ("127.0.0.1", 1), object(), rfile=io.BytesIO())
    # what pywsgi sets while it reads a request
    h.request_version, h.command, h.close_connection, h.response_length, h.environ = "HTTP/1.1", "POST", False, 0, {}
    h.provided_date = "Sun, 29 Nov 2026 04:00:00 GMT"
    h.start_response("200 OK", [*headers, ("Date", h.provided_date)])
    for chunk in chunks:
        h.write(chunk)
    return sock, h


@pytest.mark.parametrize(
    ("headers", "chunks", "sends", "gevents"),
    [
        ([("Content-Type", "application/json"), ("Content-Length", "11")], [b'{"ok":true}'], 1, 2),
        ([("Content-Type", "text/plain")], [b"first", b"second"], 2, 3),  # no length: chunked, framed alike
        ([("Content-Length", "0")], [b""], 1, 1),
    ],
)
def test_a_small_answer_goes_in_one_send_with_the_same_bytes(
    headers: list[tuple[str, str]], chunks: list[bytes], sends: int, gevents: int
) -> None:
    ours, h = _answer(_TimedHandler, headers, chunks)
    theirs, g = _answer(PyWSGIHandler, headers, chunks)
    assert (len(ours.sent), len(theirs.sent)) == (sends, gevents)  # the headers go with the first chunk
    assert b"".join(ours.sent) == b"".join(theirs.sent) and h.response_length == g.response_length


def test_a_large_answer_is_sent_as_gevent_sends_it() -> None:
    body = b"x" * (ONE_SEND_MAX + 1)
    headers = [("Content-Length", str(len(body)))]
    ours, _ = _answer(_TimedHandler, headers, [body])
    theirs, _ = _answer(PyWSGIHandler, headers, [body])
    assert ours.sent == theirs.sent and len(ours.sent) == 2


def test_a_failed_send_raises_as_before_and_leaves_nothing_held() -> None:
    with pytest.raises(ConnectionResetError):
        _answer(_TimedHandler, [("Content-Length", "2")], [b"ok"], fail=True)
    sock, h = _answer(_TimedHandler, [("Content-Length", "2")], [b"ok"])
    assert h._held is None and sock.sent[0].endswith(b"\r\n\r\nok")
