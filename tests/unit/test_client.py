"""The client's pure parts: when it retries and after how long, how errors come back, how
``redbatch predict`` lays out its report."""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import time

import pytest

from common.client import Client, Prediction, RetryPolicy, Scored, _http_error, content_type_of, parse_retry_after
from common.errors import (
    DeadlineExceeded,
    InvalidImage,
    ModelNotFound,
    QueueFull,
    RedbatchError,
    Unavailable,
)
from common.predict import format_report

POLICY = RetryPolicy(retries=3, backoff_s=0.1, max_backoff_s=5.0, jitter=0.0)


def test_a_503_with_retry_after_is_retried_after_the_time_asked() -> None:
    assert POLICY.after_status(0, 503, "1") == 1.0
    assert POLICY.after_status(2, 503, "2") == 2.0


def test_what_may_have_run_or_will_fail_again_is_not_retried() -> None:
    assert POLICY.after_status(0, 503, None) is None  # no Retry-After: not the service saying "nothing ran"
    for status in (400, 401, 404, 413, 415, 500, 502, 504):
        assert POLICY.after_status(0, status, "1") is None, status


def test_retries_stop_after_the_budget_and_at_a_retry_after_past_the_cap() -> None:
    assert POLICY.after_status(3, 503, "1") is None
    assert POLICY.after_status(0, 503, "6") is None  # longer than max_backoff_s: give up rather than wait less
    assert RetryPolicy(retries=0).after_status(0, 503, "1") is None


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    assert [POLICY.after_error(n, refused, sent=False, idempotent=False) for n in range(3)] == [0.1, 0.2, 0.4]
    jittery = RetryPolicy(retries=10, backoff_s=1.0, max_backoff_s=3.0, jitter=0.5, rand=lambda: 1.0)
    assert jittery.after_error(0, refused, sent=False, idempotent=False) == 1.5
    assert jittery.after_error(5, refused, sent=False, idempotent=False) == 3.0
    assert jittery.after_status(0, 503, "0") == 1.5  # Retry-After 0: the backoff still spaces attempts


def test_failures_before_the_request_was_sent_are_retried() -> None:
    for exc in (ConnectionRefusedError(), ConnectionResetError(), TimeoutError("connect"), BrokenPipeError()):
        assert POLICY.after_error(0, exc, sent=False, idempotent=False) == 0.1, exc


def test_a_predict_that_fails_after_sending_is_not_retried() -> None:
    for exc in (TimeoutError("read"), ConnectionResetError(), http.client.RemoteDisconnected("closed")):
        assert POLICY.after_error(0, exc, sent=True, idempotent=False) is None, exc


def test_an_idempotent_get_is_retried_after_a_lost_connection_but_not_a_timeout() -> None:
    assert POLICY.after_error(0, ConnectionResetError(), sent=True, idempotent=True) == 0.1
    assert POLICY.after_error(0, TimeoutError("read"), sent=True, idempotent=True) is None


def test_bugs_are_not_retried() -> None:
    assert POLICY.after_error(0, ValueError("bad"), sent=False, idempotent=True) is None


def test_retry_after_as_seconds_or_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    in_10s = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= (parse_retry_after(in_10s) or 0) <= 10
    assert parse_retry_after(email.utils.formatdate(time.time() - 100, usegmt=True)) == 0.0
    assert parse_retry_after("soon") is None


def test_errors_are_rebuilt_from_the_json_body() -> None:
    body = json.dumps({"error": {"code": "queue_full", "message": "the queue is full"}}).encode()
    exc = _http_error(503, body)
    assert isinstance(exc, QueueFull) and exc.message == "the queue is full" and exc.status == 503
    assert isinstance(_http_error(400, b'{"error": {"code": "invalid_image", "message": "no"}}'), InvalidImage)
    unknown = _http_error(405, b'{"error": {"code": "method_not_allowed", "message": "use POST"}}')
    assert type(unknown) is RedbatchError and "method_not_allowed" in unknown.message and "use POST" in unknown.message


def test_a_proxys_page_maps_by_status() -> None:
    assert isinstance(_http_error(502, b"<html>Bad Gateway</html>"), Unavailable)
    assert isinstance(_http_error(504, b""), DeadlineExceeded)
    assert isinstance(_http_error(404, b"not here"), ModelNotFound)
    assert "HTTP 418" in _http_error(418, b"teapot").message


def test_content_type_from_the_first_bytes() -> None:
    assert content_type_of(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert content_type_of(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert content_type_of(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert content_type_of(b"GIF89a") == "application/octet-stream"


def test_base_url_is_checked() -> None:
    with pytest.raises(ValueError):
        Client("127.0.0.1:8000")
    Client("https://example.com:8443/prefix/").close()


def test_prediction_from_the_services_json() -> None:
    doc = {
        "id": "abc",
        "model": "resnet18",
        "predictions": [{"index": 281, "label": "tabby", "score": 0.57}, {"index": 5, "label": "x", "score": 0.1}],
        "batch_size": 7,
        "queue_ms": 5,
        "infer_ms": 14.807,
    }
    p = Prediction.from_json(doc)
    assert p.predictions[0] == Scored(281, "tabby", 0.57)
    index, label, score = p.predictions[1]
    assert (index, label, score) == (5, "x", 0.1)
    assert (p.batch_size, p.queue_ms, p.infer_ms) == (7, 5, 14.807)
    assert (p.timing, p.total_ms, p.http_ms) == ({}, None, None)  # nothing about time was given

    timed = Prediction.from_json(doc, {"api": 0.25, "queue": 1.0, "infer": 14.807}, total_ms=17.0)
    assert timed.http_ms is not None and math.isclose(timed.http_ms, 17.0 - 16.057)
    assert Prediction.from_json(doc, {"api": 0.25, "wait": 20.0}, total_ms=17.0).http_ms == 0.0  # clocks disagree


def test_the_predict_report_aligns_every_image_and_names_failures() -> None:
    a = Prediction("1", "resnet18", [Scored(281, "tabby", 0.5712), Scored(5, "electric ray", 0.2)], 3, 5, 14.807)
    b = Prediction("2", "resnet18", [Scored(1000, "x", 0.9)], 1, 0, 2.0)
    text = format_report([("cat.jpg", a), ("missing.jpg", "cannot read: No such file"), ("b.png", b)])
    assert text.splitlines() == [
        "cat.jpg: resnet18, batch 3, queue 5 ms, infer 14.8 ms",
        "   281  tabby         0.5712",
        "     5  electric ray  0.2000",
        "missing.jpg: error cannot read: No such file",
        "b.png: resnet18, batch 1, queue 0 ms, infer 2.0 ms",
        "  1000  x             0.9000",
    ]


def test_the_predict_report_shows_where_the_time_went_when_asked() -> None:
    timing = {"api": 0.2, "queue": 0.714, "prep": 1.88, "batch": 0.12, "infer": 4.62}
    timed = Prediction("1", "m", [Scored(3, "x", 0.5)], 1, 4, 4.62, timing, total_ms=8.104)
    old = Prediction("2", "m", [Scored(3, "x", 0.5)], 1, 4, 4.62, {}, total_ms=9.0)
    lines = format_report([("a.jpg", timed), ("b.jpg", old), ("c.jpg", "cannot read: gone")], timing=True).splitlines()
    assert lines[1] == "  time 8.10 ms: api 0.20, queue 0.71, prep 1.88, batch 0.12, infer 4.62, http 0.57"
    assert lines[4] == "  time 9.00 ms (the service sent no Server-Timing)"
    assert lines[6] == "c.jpg: error cannot read: gone"
    assert "time" not in format_report([("a.jpg", timed)])  # only when asked
