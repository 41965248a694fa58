"""Prometheus metrics: the API's /metrics (Flask's test client) and a worker's, on a real Redis.

Both run in this process, so both write to the default registry: each test serves a model name of
its own, and compares before and after where a label is shared (the empty model of unknown names).
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis
import torch
from flask.testing import FlaskClient
from PIL import Image
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.app import create_app
from common.config import Settings
from common.queues import PRIORITIES
from tests.integration.conftest import RunningWorker, TinyHandler
from worker.broker import WorkerBroker
from worker.metrics import RedisGauges

JPEG = {"Content-Type": "image/jpeg"}


def _solid(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (value, value, value)).save(buf, "PNG")
    return buf.getvalue()


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition text, keyed by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _api_metrics(client: FlaskClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    return scrape(resp.get_data(as_text=True))


class GatedHandler(TinyHandler):
    """Its first forward pass waits for ``release``: requests queue up behind a busy model."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        return super().forward(batch)


def test_api_and_worker_count_requests_by_model_and_outcome(
    settings: Settings, start_worker: Callable[..., RunningWorker]
) -> None:
    model = f"m{uuid.uuid4().hex[:8]}"
    handler = GatedHandler()
    w = start_worker(handler, model_name=model, max_batch_size=8, window_ms=20)
    app = create_app(settings)
    client = app.test_client()
    before = _api_metrics(client)

    def predict(v: int, headers: dict[str, str] | None = None, path: str = f"/v1/models/{model}/predict") -> int:
        return app.test_client().post(path, data=_solid(v), headers={**JPEG, **(headers or {})}).status_code

    with ThreadPoolExecutor(8) as ex:
        first = ex.submit(predict, 10)
        assert handler.entered.wait(5)
        # The model is busy: this request waits behind it past its deadline (504), and the worker
        # skips it (expired) once the model is free.
        assert predict(20, {"X-Request-Timeout-Ms": "200"}) == 504
        handler.release.set()
        assert first.result() == 200
        assert list(ex.map(predict, [30, 40, 50, 60, 70, 80])) == [200] * 6
    assert predict(90, path=f"/v1/models/{model}/predict?topk=0") == 400
    assert predict(90, path=f"/v1/models/nope-{model}/predict") == 404

    after = _api_metrics(client)
    assert value(after, "redbatch_requests_total", model=model, code="200") == 7
    assert value(after, "redbatch_requests_total", model=model, code="504") == 1
    assert value(after, "redbatch_requests_total", model=model, code="400") == 1
    assert value(after, "redbatch_request_duration_seconds_count", model=model) == 9
    assert value(after, "redbatch_requests_expired_total", model=model) == 1
    # A name no worker serves is counted without its name: labels stay bounded whatever clients send.
    unknown = ("redbatch_requests_total", frozenset({"model": "", "code": "404"}.items()))
    assert after.get(unknown, 0.0) - before.get(unknown, 0.0) == 1
    assert not any(f"nope-{model}" in dict(labels).get("model", "") for _, labels in after)
    assert value(after, "redbatch_requests_in_progress") == value(before, "redbatch_requests_in_progress")

    # The worker: one execution per forward pass, one inference per item it answered.
    executions = len(handler.batch_sizes)
    assert value(after, "redbatch_inference_count_total", model=model) == 7
    assert value(after, "redbatch_execution_count_total", model=model) == executions
    assert executions < 7  # the six concurrent requests shared forward passes
    assert value(after, "redbatch_batch_size_sum", model=model) == 7
    assert value(after, "redbatch_batch_size_count", model=model) == executions
    assert value(after, "redbatch_compute_duration_seconds_count", model=model) == executions
    assert value(after, "redbatch_queue_duration_seconds_count", model=model) == 7
    assert value(after, "redbatch_expired_total", model=model) == 1
    assert value(after, "redbatch_errors_total", model=model) == 0
    assert value(after, "redbatch_worker_up", model=model) == 1
    w.stop()
    assert value(scrape(generate_latest(REGISTRY).decode()), "redbatch_worker_up", model=model) == 0


def test_a_full_queue_is_counted_as_rejected(settings: Settings) -> None:
    model = f"m{uuid.uuid4().hex[:8]}"
    s = settings.replace(max_queue_length=1)
    # A live-looking worker that never pops: the first request fills the queue and times out.
    WorkerBroker(redis.Redis.from_url(s.redis_url), s.replace(model=model), "ghost").register(
        {"model": model, "max_batch_size": 4, "spec": json.dumps(TinyHandler.spec.to_dict())}
    )
    client = create_app(s).test_client()
    url = f"/v1/models/{model}/predict"
    assert client.post(url, data=_solid(1), headers={**JPEG, "X-Request-Timeout-Ms": "50"}).status_code == 504
    resp = client.post(url, data=_solid(1), headers=JPEG)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    m = _api_metrics(client)
    assert value(m, "redbatch_requests_total", model=model, code="503") == 1
    assert value(m, "redbatch_requests_rejected_total", model=model) == 1
    assert value(m, "redbatch_requests_expired_total", model=model) == 1


def test_queue_length_and_in_flight_gauges_are_read_from_redis(settings: Settings, r: redis.Redis) -> None:
    keys, model = settings.keys, "tiny"
    queues = {p: keys.queue(model, p) for p in PRIORITIES}
    r.rpush(queues["normal"], b"a", b"b", b"c")
    r.rpush(queues["low"], b"d")
    r.rpush(keys.inflight("w1"), b"e", b"f")
    registry = CollectorRegistry()
    registry.register(RedisGauges(r, model, queues, lambda _r: [keys.inflight("w1")]))
    m = scrape(generate_latest(registry).decode())
    assert value(m, "redbatch_queue_length", model=model, priority="normal") == 3
    assert value(m, "redbatch_queue_length", model=model, priority="low") == 1
    assert value(m, "redbatch_queue_length", model=model, priority="high") == 0
    assert value(m, "redbatch_inflight_requests", model=model) == 2
    down = RedisGauges(
        redis.Redis(port=1, retry=Retry(NoBackoff(), 0)), model, queues, lambda _r: [keys.inflight("w1")]
    )
    assert list(down.collect()) == []  # a scrape during an outage still answers, without these two
