"""``--api-worker-class gevent_pywsgi``: gunicorn's gevent worker with gevent's own HTTP server
(``gevent.pywsgi``), given the keep-alive timeout that gunicorn's own parser has and pywsgi lacks.

pywsgi writes a response's headers and body in one ``send`` and parses a request with less Python
than gunicorn's parser (bench/api_check.sh, docs/benchmarks.md). Left alone it would hold an idle
keep-alive connection, and its greenlet, until the client closed it. Here the wait for a request
line times out after gunicorn's ``keepalive`` seconds (pywsgi then ends the connection quietly, as
for any socket error before a request line), and any other read or write on the client's socket
after ``REQUEST_TIMEOUT_S``, so a client that stalls mid-request is dropped too. gunicorn's master
imports this module to load the class, so it imports nothing of the app.
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

REQUEST_TIMEOUT_S = 30.0  # one socket operation inside a request; the API's BLPOP never touches the socket


class _TimedHandler(PyWSGIHandler):  # type: ignore[misc]
    keepalive_s = 5.0  # set from gunicorn's config by the worker

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
