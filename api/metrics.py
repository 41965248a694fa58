"""The API's Prometheus metrics, one set per gunicorn process, merged at scrape time.

Under gunicorn, ``api/server.py`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before
it forks, so each process writes its values to memory-mapped files there and ``render`` merges the
files of every process (live or dead) into one answer: a scrape reports the service's totals
whichever process answers it. Without the variable (Flask's test client, ``flask run``), the
process's own registry is served.

prometheus_client chooses between the two modes when it is first imported, so nothing may import
this module before the variable is set (the gunicorn master never does; each worker imports it in
``load``, after the fork).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("redbatch_requests", "Predict requests answered, by model and HTTP status", ["model", "code"])
DURATION = Histogram(
    "redbatch_request_duration_seconds", "Predict request latency in the API, any outcome", ["model"], buckets=SECONDS
)
REJECTED = Counter("redbatch_requests_rejected", "Predict requests refused: the queue was full (503)", ["model"])
EXPIRED = Counter("redbatch_requests_expired", "Predict requests with no reply before their deadline (504)", ["model"])
IN_PROGRESS = Gauge("redbatch_requests_in_progress", "Predict requests being handled now", multiprocess_mode="livesum")


def observe(model: str, status: int, error_code: str | None, seconds: float) -> None:
    """One answered predict request. ``model`` must be a bounded label value (a served model or "")."""
    REQUESTS.labels(model, str(status)).inc()
    DURATION.labels(model).observe(seconds)
    if error_code == "queue_full":
        REJECTED.labels(model).inc()
    elif error_code == "deadline_exceeded":
        EXPIRED.labels(model).inc()


def label(served: set[str], model: str, served_now: bool) -> str:
    """The ``model`` label of a request for ``model``: the name once a live worker has served it
    (``served_now`` adds it to ``served``), else "" (a client's made-up names stay out of the labels)."""
    if served_now:
        served.add(model)
    return model if model in served else ""


def render() -> tuple[bytes, str]:
    """The exposition text of every process (multiprocess mode) or of this one, and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
