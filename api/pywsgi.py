"""``--api-worker-class gevent_pywsgi``: gunicorn's gevent worker with gevent's own HTTP server
(``gevent.pywsgi``), given the keep-alive timeout that gunicorn's own parser has and pywsgi lacks.

pywsgi parses a request with less Python than gunicorn's parser (bench/api_check.sh,
docs/benchmarks.md). It sends an answer's status line and headers, then its body, in two sends
(gevent 26: it saves copying a large body); for an answer up to ``ONE_SEND_MAX`` bytes, such as
every prediction's JSON, the handler here sends both in one, which saves the API a send (a
``getsockopt`` and a ``sendto`` through gevent's ``sendall``) and the client a read.

Left alone pywsgi would hold an idle keep-alive connection, and its greenlet, until the client
closed it. Here the wait for a request line times out after gunicorn's ``keepalive`` seconds
(pywsgi then ends the connection quietly, as for any socket error before a request line), and any
other read or write on the client's socket after ``REQUEST_TIMEOUT_S``, so a client that stalls
mid-request is dropped too. gunicorn's master imports this module to load the class, so it
imports nothing of the app.

Request headers are read by ``lean_headers``: pywsgi's own reader hands them to the standard
library's email parser, 40 µs a request (7 % of an API process's CPU on the path with no model,
docs/benchmarks.md); plain ``Name: value`` lines need none of it. Anything else (folded lines,
lines without a name, line endings inside a line, too long or too many lines) goes to that parser
as it came, so what pywsgi sees is the same either way.
"""

from __future__ import annotations

import re
from http import client
from typing import Any, BinaryIO

from gevent.pywsgi import OldMessage, headers_factory
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

ONE_SEND_MAX = 64 * 1024  # an answer's headers and first body chunk up to this go in one send
REQUEST_TIMEOUT_S = 30.0  # one socket operation inside a request; the API's BLPOP never touches the socket
_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # what the email parser takes for a header's name
_MAXLINE, _MAXHEADERS = client._MAXLINE, client._MAXHEADERS  # type: ignore[attr-defined]


class _Replay:
    """The lines read so far, then the rest of ``fp``: for the standard parser to read it all."""

    def __init__(self, lines: list[bytes], fp: BinaryIO) -> None:
        self._lines = lines
        self._fp = fp

    def readline(self, limit: int = -1) -> bytes:
        return self._lines.pop(0) if self._lines else self._fp.readline(limit)


def lean_headers(fp: BinaryIO) -> Any:
    """The request's headers from ``fp`` as pywsgi's ``headers_factory`` reads them (an
    ``OldMessage``), without the email parser for plain ``Name: value`` lines."""
    lines: list[bytes] = []
    fields: list[tuple[str, str]] = []
    while True:
        line = fp.readline(_MAXLINE + 1)
        lines.append(line)
        if line in (b"\r\n", b"\n", b""):
            break
        text = line.decode("iso-8859-1")
        body = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
        name, colon, value = body.partition(":")
        plain = colon and "\r" not in body and _NAME.fullmatch(name)  # readline leaves no LF inside
        if not plain or len(line) > _MAXLINE or len(lines) > _MAXHEADERS:
            return headers_factory(_Replay(lines, fp))
        fields.append((name, value.lstrip(" \t")))
    msg = OldMessage()
    msg._headers = fields  # what email.message.Message keeps: (name, value) in order
    return msg


class _TimedHandler(PyWSGIHandler):  # type: ignore[misc]
    keepalive_s = 5.0  # set from gunicorn's config by the worker
    _held: list[bytes] | None = None  # what pywsgi sends while its headers are being written

    def _write_with_headers(self, data: bytes) -> None:
        if len(data) > ONE_SEND_MAX:
            super()._write_with_headers(data)
            return
        self._held = []
        try:
            super()._write_with_headers(data)  # the headers, then the body as pywsgi frames it
            whole = b"".join(self._held)
        finally:
            self._held = None
        self._sendall(whole)

    def _sendall(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        else:
            super()._sendall(data)

    def MessageClass(self, fp: BinaryIO, *_args: Any) -> Any:  # pywsgi calls it by this name
        return lean_headers(fp)

    def log_request(self) -> None:
        # gunicorn's version builds datetimes, a response object and the header list for every
        # request (2-3 % of the API's CPU in a profile) before its logger drops them when no
        # access log is configured (the default of ``redbatch api``).
        if getattr(self.server.log, "access_log_enabled", True):
            super().log_request()

    def read_requestline(self) -> Any:
        self.socket.settimeout(self.keepalive_s)
        try:
            return super().read_requestline()
        finally:
            self.socket.settimeout(REQUEST_TIMEOUT_S)


class PyWSGIWorker(GeventPyWSGIWorker):  # type: ignore[misc]
    wsgi_handler = _TimedHandler

    def run(self) -> None:
        _TimedHandler.keepalive_s = float(self.cfg.keepalive) or REQUEST_TIMEOUT_S
        super().run()
