"""A small Python client for the HTTP API, with the standard library only (no torch, no requests).

    with Client("http://127.0.0.1:8000") as c:
        p = c.predict("cat.jpg", "resnet18", topk=3)
        print(p.predictions[0].label, p.batch_size)
        print(p.total_ms, p.timing)  # this client's wall time; the service's Server-Timing parts

Connections: each thread keeps one keep-alive ``http.client`` connection per client, so a client
can be shared by threads and reuses its connections; ``close`` closes them all.

Retries only where the request cannot have run (``RetryPolicy``): the connection failed before
the request was sent (refused, reset, connect timeout), or the service answered 503 with a
``Retry-After`` (queue full, Redis unavailable: it processed nothing). A 504, any 4xx, a read
timeout or a connection lost after the request was sent are never retried for ``predict``: the
request may have run. Idempotent GETs (``models``, ``ready``) are also retried after a lost
connection, never after a timeout. A keep-alive connection that the server has closed while idle
is noticed before it is reused (as urllib3 does), so that race does not cost a request.

Every error raises a ``common.errors.RedbatchError`` subclass: the service's ``{"error": {"code",
"message"}}`` rebuilt with ``error_from_wire``; ``Unavailable`` when the service cannot be reached,
``DeadlineExceeded`` when it does not answer within ``timeout_s``.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import os
import random
import selectors
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from common.errors import (
    BadRequest,
    DeadlineExceeded,
    ModelNotFound,
    PayloadTooLarge,
    RedbatchError,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    error_from_wire,
)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0  # above the service's own deadline (10 s), so that its 504 arrives first
TIMEOUT_MARGIN_S = 5.0

# What a non-JSON error body (a proxy's page) maps to; the service's own errors carry their code.
_BY_STATUS: dict[int, type[RedbatchError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: ModelNotFound,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    502: Unavailable,
    503: Unavailable,
    504: DeadlineExceeded,
}


class Scored(NamedTuple):
    """One of the top-k classes."""

    index: int  # type: ignore[assignment]  # shadows tuple.index, which nobody needs here
    label: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """The answer to one image: the service's JSON, typed.

    ``timing``: where the service says the request's time went (its ``Server-Timing`` header, in
    ms and in its order: ``api``, ``queue``, ``prep``, ``batch``, ``infer``; empty when it sent
    none); ``total_ms``: this client's wall time for the attempt that was answered, from sending
    the request to reading the answer (``http_ms`` is what the service's parts leave of it).
    """

    id: str
    model: str
    predictions: list[Scored]
    batch_size: int | None
    queue_ms: float | None
    infer_ms: float | None
    timing: dict[str, float] = field(default_factory=dict)
    total_ms: float | None = None

    @classmethod
    def from_json(
        cls, doc: Mapping[str, Any], timing: Mapping[str, float] | None = None, total_ms: float | None = None
    ) -> Prediction:
        return cls(
            id=str(doc["id"]),
            model=str(doc["model"]),
            predictions=[Scored(int(p["index"]), str(p["label"]), float(p["score"])) for p in doc["predictions"]],
            batch_size=doc.get("batch_size"),
            queue_ms=doc.get("queue_ms"),
            infer_ms=doc.get("infer_ms"),
            timing=dict(timing or {}),
            total_ms=total_ms,
        )

    @property
    def http_ms(self) -> float | None:
        """The client's wall time beyond the service's parts: the HTTP exchange and both ends'
        parsing (None without the service's timing)."""
        if self.total_ms is None or not self.timing:
            return None
        return max(self.total_ms - sum(self.timing.values()), 0.0)


def parse_server_timing(header: str | None) -> dict[str, float]:
    """``{name: ms}`` from a ``Server-Timing`` header's ``name;dur=ms`` entries, in order; entries
    without a readable ``dur`` are left out (a header is the server's, or a proxy's, to garble)."""
    out: dict[str, float] = {}
    for entry in (header or "").split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if name and key.strip().lower() == "dur":
                try:
                    ms = float(value.strip().strip('"'))
                except ValueError:
                    continue
                if math.isfinite(ms):
                    out[name] = ms
    return out


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again, and after how long: pure decisions, tested without a network.

    ``retries`` is how many attempts may follow the first. The n-th retry waits ``backoff_s * 2**n``
    (at least the ``Retry-After`` the service asked for) plus up to ``jitter`` of it at random, and
    at most ``max_backoff_s``; a ``Retry-After`` longer than ``max_backoff_s`` is not waited for.
    """

    retries: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    jitter: float = 0.2
    rand: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def after_status(self, attempt: int, status: int, retry_after: str | None) -> float | None:
        """Seconds to wait before retrying attempt ``attempt`` (0-based) that got ``status``; None: do not."""
        if attempt >= self.retries or status != 503 or retry_after is None:
            return None
        asked_s = parse_retry_after(retry_after)
        if asked_s is None or asked_s > self.max_backoff_s:
            return None
        return self._delay(attempt, asked_s)

    def after_error(self, attempt: int, exc: BaseException, sent: bool, idempotent: bool) -> float | None:
        """Seconds to wait before retrying an attempt that raised ``exc``; None: do not.

        ``sent``: the request was fully written before the failure, so the service may have run it.
        """
        if attempt >= self.retries or not isinstance(exc, OSError | http.client.HTTPException):
            return None
        if not sent:
            return self._delay(attempt, 0.0)  # refused, reset or timed out while connecting or sending
        if idempotent and not isinstance(exc, TimeoutError):
            return self._delay(attempt, 0.0)
        return None

    def _delay(self, attempt: int, at_least_s: float) -> float:
        base = max(at_least_s, self.backoff_s * 2.0**attempt)
        return min(base * (1 + self.jitter * self.rand()), max(self.max_backoff_s, at_least_s))


def parse_retry_after(value: str) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None when unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def content_type_of(data: bytes) -> str:
    """The image's media type from its first bytes; the service checks it again."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class _Answer(NamedTuple):
    """One attempt's answer: what the client reads of it."""

    status: int
    retry_after: str | None
    server_timing: str | None
    data: bytes
    elapsed_ms: float  # from sending the request to reading the answer


class _Sent(Exception):
    """Wraps a failure that happened after the request was fully written."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Client:
    """The service at ``base_url`` (``http://`` or ``https://``, optionally with a path prefix).

    ``api_key`` is sent as ``Authorization: Bearer``; ``timeout_s`` bounds every connect and read;
    ``retries`` is how many times a request may be retried where that is safe (see the module).
    Thread-safe: each thread uses its own connection.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        policy: RetryPolicy | None = None,
    ) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port][/path], not {base_url!r}")
        self.base_url = base_url
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port
        self._path = url.path.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "redbatch-client"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self.policy = policy or RetryPolicy(retries=retries)
        self._local = threading.local()
        self._all: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.sleep: Callable[[float], None] = time.sleep

    # ---- the API -------------------------------------------------------------------------------

    def predict(
        self, image: bytes | str | os.PathLike[str], model: str, topk: int = 5, timeout_ms: int | None = None
    ) -> Prediction:
        """Classify one image (its encoded bytes, or a path to a file); raises a ``RedbatchError``.

        ``timeout_ms`` asks the service for a shorter deadline (``X-Request-Timeout-Ms``).
        """
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        headers = {"Content-Type": content_type_of(data)}
        read_timeout_s = self.timeout_s
        if timeout_ms is not None:
            headers["X-Request-Timeout-Ms"] = str(int(timeout_ms))
            read_timeout_s = max(read_timeout_s, timeout_ms / 1000 + TIMEOUT_MARGIN_S)
        path = f"/v1/models/{urllib.parse.quote(model, safe='')}/predict?topk={int(topk)}"
        doc, answer = self._call("POST", path, data, headers, idempotent=False, timeout_s=read_timeout_s)
        return Prediction.from_json(doc, parse_server_timing(answer.server_timing), answer.elapsed_ms)

    def models(self) -> list[dict[str, Any]]:
        """The models live workers serve: name, input spec, max batch size, live workers, devices."""
        models: list[dict[str, Any]] = self._call("GET", "/v1/models", None, {}, idempotent=True)[0]["models"]
        return models

    def ready(self) -> bool:
        """Whether the service answers ``/readyz`` with 200 (Redis up, a live worker); one attempt."""
        try:
            answer = self._send("GET", "/readyz", None, {}, self.timeout_s)
        except (_Sent, OSError, http.client.HTTPException):
            return False
        return answer.status == 200

    def close(self) -> None:
        """Close every thread's connection; the client stays usable (it reconnects)."""
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport -----------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        idempotent: bool,
        timeout_s: float | None = None,
    ) -> tuple[dict[str, Any], _Answer]:
        """One request with its retries: the decoded JSON body of a 2xx answer and the answer, or a
        raised error."""
        attempt = 0
        while True:
            delay_s: float | None
            try:
                answer = self._send(method, path, body, headers, timeout_s or self.timeout_s)
            except (_Sent, OSError, http.client.HTTPException) as exc:
                sent = isinstance(exc, _Sent)
                cause = exc.cause if isinstance(exc, _Sent) else exc
                delay_s = self.policy.after_error(attempt, cause, sent, idempotent)
                if delay_s is None:
                    raise _transport_error(self.base_url, cause, sent) from cause
            else:
                if 200 <= answer.status < 300:
                    return _json_body(answer.status, answer.data), answer
                delay_s = self.policy.after_status(attempt, answer.status, answer.retry_after)
                if delay_s is None:
                    raise _http_error(answer.status, answer.data)
            attempt += 1
            self.sleep(delay_s)

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout_s: float) -> _Answer:
        """One attempt: status, Retry-After, Server-Timing, body and the time taken. Failures while
        writing the request raise as they are; failures after it was written raise ``_Sent``. The
        connection is dropped on any."""
        conn = self._connection()
        conn.timeout = timeout_s
        if conn.sock is not None:
            conn.sock.settimeout(timeout_s)
        t0 = time.perf_counter()
        try:
            conn.request(method, self._path + path, body=body, headers={**self._headers, **headers})
        except BaseException:
            conn.close()
            raise
        try:
            resp = conn.getresponse()
            data = resp.read()
        except Exception as exc:
            conn.close()
            raise _Sent(exc) from exc
        except BaseException:  # KeyboardInterrupt: the connection is in an unknown state
            conn.close()
            raise
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        return _Answer(resp.status, resp.getheader("Retry-After"), resp.getheader("Server-Timing"), data, elapsed_ms)

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._all.add(conn)
        elif conn.sock is not None and _dropped(conn.sock):
            conn.close()  # the server closed it while idle: reconnect rather than lose a request
        return conn


def _dropped(sock: Any) -> bool:
    """An idle keep-alive socket that is readable has been closed by the server (or is unusable)."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(0))


def _json_body(status: int, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise RedbatchError(f"HTTP {status} with a body that is not a JSON object: {data[:100]!r}")
    return doc


def _http_error(status: int, data: bytes) -> RedbatchError:
    try:
        err = json.loads(data)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        text = data[:200].decode("utf-8", "replace").strip()
        return _BY_STATUS.get(status, RedbatchError)(f"HTTP {status}: {text or 'no body'}")
    exc = error_from_wire(code, message)
    if type(exc) is RedbatchError:  # a code this client does not know: keep it in the message
        exc = RedbatchError(f"{code} (HTTP {status}): {message}")
    return exc


def _transport_error(base_url: str, exc: BaseException, sent: bool) -> RedbatchError:
    if sent and isinstance(exc, TimeoutError):
        return DeadlineExceeded(f"no answer from {base_url} in time; the request may have run")
    where = "after the request was sent; it may have run" if sent else "before the request was sent"
    return Unavailable(f"{base_url}: {type(exc).__name__}: {exc} ({where})")
