"""/v2 on a real Redis (Flask's test client and a worker thread): what the end-to-end tests with
tritonclient cannot see from outside."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import redis

from api.app import create_app
from common.config import Settings
from tests.integration.conftest import RunningWorker, TinyHandler, expected_top1, server_timing
from worker.broker import WorkerBroker


def _pixels(values: list[int]) -> dict[str, object]:
    """A UINT8 input of len(values) solid 8x8 images for the tiny model."""
    n = len(values)
    return {
        "name": "pixels",
        "datatype": "UINT8",
        "shape": [n, 8, 8, 3],
        "data": [v for v in values for _ in range(192)],
    }


def test_the_images_of_one_request_share_a_batch_and_come_back_in_order(
    settings: Settings, start_worker: Callable[..., RunningWorker]
) -> None:
    worker = start_worker(window_ms=200.0)  # long enough that a batch never leaves half-full here
    client = create_app(settings.replace(model="tiny", request_timeout_s=5.0)).test_client()
    values = [10, 60, 110, 160, 210, 250, 30, 90]
    t0 = time.perf_counter()
    resp = client.post("/v2/models/tiny/infer", json={"inputs": [_pixels(values)], "parameters": {"topk": 1}})
    wall_ms = (time.perf_counter() - t0) * 1000.0
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    indices = next(o for o in body["outputs"] if o["name"] == "indices")
    assert indices["shape"] == [8, 1] and indices["data"] == [expected_top1(v) for v in values]
    assert worker.handler.batch_sizes == [8] and body["parameters"]["batch_size"] == 8
    # where the request's time went, as /v1 says it; the batch waited out most of its 200 ms window
    timing = server_timing(resp.headers.get("Server-Timing"))
    assert list(timing) == ["api", "queue", "prep", "batch", "infer"]
    assert all(ms >= 0 for ms in timing.values()) and sum(timing.values()) <= wall_ms
    assert timing["infer"] == body["parameters"]["infer_ms"] and timing["batch"] > 100


def test_api_keys_guard_v2_models_but_not_its_probes(
    settings: Settings, start_worker: Callable[..., RunningWorker]
) -> None:
    start_worker()
    client = create_app(settings.replace(model="tiny", api_keys="k-one")).test_client()
    infer = {"inputs": [_pixels([50])]}
    for method, path in [
        ("GET", "/v2/models/tiny"),
        ("GET", "/v2/models/tiny/ready"),
        ("POST", "/v2/models/tiny/infer"),
    ]:
        resp = client.open(path, method=method, json=infer)
        assert resp.status_code == 401 and isinstance(resp.get_json()["error"], str)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    ok = client.post("/v2/models/tiny/infer", json=infer, headers={"Authorization": "Bearer k-one"})
    assert ok.status_code == 200
    for path in ("/v2/health/live", "/v2/health/ready", "/v2"):
        assert client.get(path).status_code == 200


def test_a_body_over_the_limit_is_413_in_v2s_shape(settings: Settings) -> None:
    client = create_app(settings.replace(max_body_bytes=1000)).test_client()
    resp = client.post("/v2/models/tiny/infer", data=json.dumps({"inputs": [_pixels([1, 2])]}))
    assert resp.status_code == 413 and "larger than 1000 bytes" in resp.get_json()["error"]


def test_a_full_queue_is_503_with_retry_after(settings: Settings) -> None:
    # A live-looking worker that never pops: the queue fills.
    ghost = {"model": "tiny", "max_batch_size": 4, "spec": json.dumps(TinyHandler.spec.to_dict())}
    WorkerBroker(redis.Redis.from_url(settings.redis_url), settings, "ghost").register(ghost)
    client = create_app(settings.replace(model="tiny", max_queue_length=3, request_timeout_s=3.0)).test_client()
    t0 = time.monotonic()
    resp = client.post("/v2/models/tiny/infer", json={"inputs": [_pixels([1, 2, 3, 4])]})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert "full" in resp.get_json()["error"]
    assert time.monotonic() - t0 < 1.5  # not after the 3 s deadline of the three that were queued
