"""``POST /v1/models/<model>/predict`` as a plain WSGI callable in front of Flask.

Profiled under load with a model-less worker (bench/api_check.sh), Flask's request context,
routing, hooks and ``jsonify`` were 13-16 % of an API process's samples; answering without them
took a third off its CPU per predict request (docs/benchmarks.md). The common case (a raw image
body with a Content-Length) is answered here by the same function the Flask route runs
(``inference.predict_v1``), with the same errors, headers and metrics; anything else (multipart
uploads, bodies without a length, other methods and routes) goes on to Flask.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from api import inference, metrics
from api.queue import QueueClient
from common.config import Settings
from common.errors import RedbatchError

logger = logging.getLogger(__name__)

RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
_PREDICT = re.compile(r"/v1/models/([^/]+)/predict")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class PredictFastPath:
    """The WSGI app: predict requests it can answer alone, everything else to ``next_app``."""

    def __init__(self, next_app: WSGIApp, settings: Settings, queue: QueueClient, served: set[str]) -> None:
        self._next = next_app
        self._settings = settings
        self._queue = queue
        self._served = served  # shared with the Flask side: model names worth a metric label

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        m = _PREDICT.fullmatch(environ.get("PATH_INFO", ""))
        length = environ.get("CONTENT_LENGTH", "")
        if (
            m is None
            or environ.get("REQUEST_METHOD") != "POST"
            or not length.isdigit()
            or "HTTP_TRANSFER_ENCODING" in environ
            or environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower() not in RAW_TYPES
        ):
            return self._next(environ, start_response)
        model = m.group(1)
        t0 = time.perf_counter()
        metrics.IN_PROGRESS.inc()
        served, error = False, None

        def mark_served() -> None:
            nonlocal served
            served = True

        try:
            body, timing = self._predict(environ, model, int(length), mark_served)
            status, headers = 200, [("Server-Timing", timing)]
        except RedbatchError as exc:
            error = exc.code
            if exc.status >= 500:
                logger.warning("%s: %s", exc.code, exc.message)
            status, body, headers = exc.status, {"error": exc.to_wire()}, inference.error_headers(exc.status)
        except Exception:
            logger.exception("unhandled error")
            status, headers = 500, []
            body = {"error": {"code": "internal", "message": "internal error; the server log has details"}}
        finally:
            metrics.IN_PROGRESS.dec()
        label = metrics.label(self._served, model, served)
        metrics.observe(label, status, error, time.perf_counter() - t0)
        # As Flask's jsonify writes it: compact, keys in order, ASCII, a newline at the end.
        data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        start_response(
            f"{status} {HTTPStatus(status).phrase}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers],
        )
        return [data]

    def _predict(
        self, environ: dict[str, Any], model: str, length: int, on_served: Callable[[], None]
    ) -> tuple[dict[str, Any], str]:
        s = self._settings
        inference.check_api_key(environ["PATH_INFO"], environ.get("HTTP_AUTHORIZATION"), s.api_key_list)

        def body() -> bytes:
            if length > s.max_body_bytes:
                raise inference.body_too_large(s.max_body_bytes)
            data: bytes = environ["wsgi.input"].read(length)
            return data

        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        topk = next((v for k, v in query if k == "topk"), None)
        priority, timeout = environ.get("HTTP_X_PRIORITY"), environ.get("HTTP_X_REQUEST_TIMEOUT_MS")
        return inference.predict_v1(self._queue, s, model, body, topk, priority, timeout, on_served)
