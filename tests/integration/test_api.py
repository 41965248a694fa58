"""The API on a real Redis (Flask's test client), with and without a worker behind it."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from flask.testing import FlaskClient
from PIL import Image

from api.app import create_app
from common.config import Settings
from common.errors import InvalidImage
from common.protocol import Request, TensorData, decode_reply, decode_request, encode_request, now_ms
from common.queues import Enqueuer
from tests.conftest import RedisServer, make_image
from tests.integration.conftest import (
    POISON,
    OomHandler,
    RunningWorker,
    TinyHandler,
    expected_top1,
    server_timing,
    wait_registered,
)
from worker.broker import WorkerBroker
from worker.threads import ThreadPlan

JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture
def tiny(settings: Settings) -> Settings:
    return settings.replace(model="tiny", request_timeout_s=5.0)


def _client(s: Settings) -> FlaskClient:
    return create_app(s).test_client()


def _solid(value: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (value, value, value)).save(buf, fmt)
    return buf.getvalue()


def _fake_registration(s: Settings) -> None:
    """A live-looking worker that never pops: requests reach the queue and nobody answers."""
    WorkerBroker(redis.Redis.from_url(s.redis_url), s, "ghost").register(
        {"model": "tiny", "max_batch_size": 4, "spec": json.dumps(TinyHandler.spec.to_dict())}
    )


def test_unserved_model_is_404(tiny: Settings) -> None:
    resp = _client(tiny).post("/v1/models/nope/predict", data=make_image(1), headers=JPEG)
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "model_not_found"


def test_no_worker_answer_is_504_at_the_deadline_and_the_frame_waits_in_the_queue(
    tiny: Settings, r: redis.Redis
) -> None:
    s = tiny.replace(request_timeout_s=0.5)
    _fake_registration(s)
    t0 = time.monotonic()
    resp = _client(s).post("/v1/models/tiny/predict", data=make_image(1), headers=JPEG)
    elapsed = time.monotonic() - t0
    assert resp.status_code == 504
    assert resp.get_json()["error"]["code"] == "deadline_exceeded"
    assert 0.45 < elapsed < 1.5
    frames = r.lrange(s.keys.queue("tiny"), 0, -1)
    assert len(frames) == 1 and decode_request(frames[0]).expired()


def test_a_late_reply_expires_on_its_own(
    tiny: Settings, r: redis.Redis, start_worker: Callable[..., RunningWorker]
) -> None:
    s = tiny.replace(request_timeout_s=0.5, reply_ttl_s=2.0)
    _fake_registration(s)
    resp = _client(s).post("/v1/models/tiny/predict", data=_solid(100), headers=JPEG)
    assert resp.status_code == 504
    # A worker that arrives late skips the expired frame and answers it with an error that expires.
    start_worker(request_timeout_s=0.5, reply_ttl_s=2.0)
    deadline = time.monotonic() + 5
    while not (replies := list(r.scan_iter(match=s.keys.reply("*")))):
        assert time.monotonic() < deadline, "the worker never answered the expired frame"
        time.sleep(0.02)
    assert len(replies) == 1 and 0 < r.pttl(replies[0]) <= 2000
    assert r.llen(s.keys.queue("tiny")) == 0
    assert r.hget(s.keys.stats("tiny"), "expired") == b"1"


def test_predict_answers_with_the_models_result(tiny: Settings, start_worker: Callable[..., RunningWorker]) -> None:
    start_worker()
    client = _client(tiny)
    for value in (0, 60, 130, 250):
        t0 = time.perf_counter()
        resp = client.post("/v1/models/tiny/predict?topk=3", data=_solid(value), headers=JPEG)
        wall_ms = (time.perf_counter() - t0) * 1000.0
        assert resp.status_code == 200, resp.get_json()
        # where its time went: the API's part, Redis's, and the worker's; within what the client waited
        timing = server_timing(resp.headers.get("Server-Timing"))
        assert list(timing) == ["api", "queue", "prep", "batch", "infer"]
        assert all(ms >= 0 for ms in timing.values()) and sum(timing.values()) <= wall_ms
        assert timing["infer"] == resp.get_json()["infer_ms"]
        body = resp.get_json()
        assert body["model"] == "tiny" and len(body["predictions"]) == 3
        top = body["predictions"][0]
        assert top["index"] == expected_top1(value) and top["label"] == f"c{top['index']}"
        assert body["batch_size"] >= 1 and body["infer_ms"] >= 0 and body["queue_ms"] >= 0


def test_redis_over_a_unix_socket_serves_predictions(
    tiny: Settings, start_worker: Callable[..., RunningWorker], tmp_path: Path
) -> None:
    sock = tmp_path / "redis.sock"
    server = RedisServer(extra_args=("--unixsocket", str(sock), "--unixsocketperm", "700"), url=f"unix://{sock}")
    server.start()
    try:
        s = tiny.replace(redis_url=server.url)
        start_worker(redis_url=server.url)
        resp = _client(s).post("/v1/models/tiny/predict", data=_solid(130), headers=JPEG)
        assert resp.status_code == 200, resp.get_json()
        assert resp.get_json()["predictions"][0]["index"] == expected_top1(130)
    finally:
        server.stop()


def test_a_connection_redis_closed_while_idle_costs_no_request(
    tiny: Settings, r: redis.Redis, start_worker: Callable[..., RunningWorker]
) -> None:
    start_worker()
    client = _client(tiny)
    assert client.post("/v1/models/tiny/predict", data=_solid(60), headers=JPEG).status_code == 200
    # The API's connection now sits idle after its BLPOP was answered (a blocked client is a
    # worker's); close every such one, as a Redis restart or a proxy's idle timeout would.
    idle = [c for c in r.client_list() if c["cmd"] == "blpop" and "b" not in c["flags"]]
    assert idle
    for c in idle:
        r.client_kill_filter(_id=c["id"])
    resp = client.post("/v1/models/tiny/predict", data=_solid(130), headers=JPEG)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["predictions"][0]["index"] == expected_top1(130)


def test_multipart_upload_works(tiny: Settings, start_worker: Callable[..., RunningWorker]) -> None:
    start_worker()
    resp = _client(tiny).post(
        "/v1/models/tiny/predict",
        data={"image": (io.BytesIO(_solid(200)), "x.png")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 200
    assert resp.get_json()["predictions"][0]["index"] == expected_top1(200)


def _multipart(body: bytes) -> dict:
    return {"data": {"image": (io.BytesIO(body), "x.png")}, "content_type": "multipart/form-data"}


@pytest.mark.parametrize(
    "path,auth,status",
    [
        ("/v1/models/tiny/predict?topk=3", "Bearer k1", 200),
        ("/v1/models/tiny/predict?topk=0", "Bearer k1", 400),
        ("/v1/models/nope/predict", "Bearer k1", 404),
        ("/v1/models/tiny/predict", "Bearer wrong", 401),
    ],
)
def test_a_raw_body_and_a_multipart_upload_get_the_same_answer(
    tiny: Settings, start_worker: Callable[..., RunningWorker], path: str, auth: str, status: int
) -> None:
    """A raw body is answered without Flask (api/fastpath.py), a multipart upload by Flask's route:
    the client cannot tell them apart, byte for byte, but for the request's own id and timings."""
    start_worker()
    client = _client(tiny.replace(api_keys="k1"))
    raw = client.post(path, data=_solid(200), headers={**JPEG, "Authorization": auth})
    form = client.post(path, headers={"Authorization": auth}, **_multipart(_solid(200)))
    assert raw.status_code == form.status_code == status
    for name in ("Content-Type", "WWW-Authenticate", "Retry-After"):
        assert raw.headers.get(name) == form.headers.get(name)
    if status != 200:
        assert raw.data == form.data and raw.get_json()["error"]["code"]
        return
    a, b = raw.get_json(), form.get_json()
    assert list(a) == list(b) == ["id", "model", "predictions", "batch_size", "queue_ms", "infer_ms"]
    assert list(server_timing(raw.headers.get("Server-Timing"))) == list(server_timing(form.headers["Server-Timing"]))
    assert a["id"] != b["id"] and a["predictions"] == b["predictions"] and len(a["predictions"]) == 3
    assert a["predictions"][0]["index"] == expected_top1(200)


def test_a_chunked_body_without_a_length_is_served(tiny: Settings, start_worker: Callable[..., RunningWorker]) -> None:
    start_worker()
    resp = _client(tiny).post(
        "/v1/models/tiny/predict",
        input_stream=io.BytesIO(_solid(70)),
        headers={**JPEG, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},  # as gunicorn sets it: read to the end
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["predictions"][0]["index"] == expected_top1(70)


def test_concurrent_requests_share_forward_passes(tiny: Settings, start_worker: Callable[..., RunningWorker]) -> None:
    w = start_worker(max_batch_size=8, window_ms=20)
    app = create_app(tiny)

    def one(v: int) -> tuple[int, int, int]:
        resp = app.test_client().post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG)
        body = resp.get_json()
        return v, body["predictions"][0]["index"], body["batch_size"]

    with ThreadPoolExecutor(24) as ex:
        results = list(ex.map(one, [i * 10 for i in range(24)]))
    assert all(idx == expected_top1(v) for v, idx, _ in results)
    assert max(bs for _, _, bs in results) > 1
    assert max(w.handler.batch_sizes) <= 8


def test_a_cpu_worker_runs_each_batch_size_on_its_planned_thread_count(
    tiny: Settings, r: redis.Redis, start_worker: Callable[..., RunningWorker]
) -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads")
    many = torch.get_num_threads()
    w = start_worker(thread_plan=ThreadPlan({1: 1, 8: many}), max_batch_size=8, window_ms=300)
    assert r.hget(tiny.keys.worker(w.worker.id), "threads") == f"1:1,8:{many}".encode()
    client = _client(tiny)
    assert client.post("/v1/models/tiny/predict", data=_solid(60), headers=JPEG).status_code == 200
    app = create_app(tiny)  # then 8 at once: one batch, on all threads

    def one(v: int) -> int:
        return app.test_client().post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG).status_code

    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(8))) == [200] * 8
    by_size = dict(zip(w.handler.batch_sizes, w.handler.threads))
    assert w.handler.batch_sizes[0] == 1 and w.handler.threads[0] == 1
    assert all(n == (1 if size == 1 else many) for size, n in by_size.items()), by_size
    assert max(w.handler.batch_sizes) > 1


def _post_at_once_and_check(settings: Settings, values: list[int]) -> None:
    """POST a solid image of each value, all at once (a thread each); each answer is its own top-1."""
    app = create_app(settings)

    def one(v: int) -> tuple[int, int]:
        resp = app.test_client().post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG)
        return v, resp.get_json()["predictions"][0]["index"]

    with ThreadPoolExecutor(len(values)) as ex:
        results = list(ex.map(one, values))
    assert all(idx == expected_top1(v) for v, idx in results)


class SlowHandler(TinyHandler):
    """Every forward pass sleeps 0.3 s (releasing the GIL, as torch's kernels do) and records when
    it ran and on how many torch threads."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[tuple[float, float, int, int]] = []  # start, end, threads, batch size
        self.lanes: list[str] = []  # the thread that ran each pass
        self.began = threading.Event()  # set when a pass starts

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        t0, threads = time.monotonic(), torch.get_num_threads()
        self.began.set()
        time.sleep(0.3)
        out = super().forward(batch)
        self.passes.append((t0, time.monotonic(), threads, batch.shape[0]))
        self.lanes.append(threading.current_thread().name)
        return out


def test_a_second_lane_runs_a_full_batch_beside_the_first_on_one_thread_and_a_lone_one_gets_all(
    tiny: Settings, r: redis.Redis, start_worker: Callable[..., RunningWorker]
) -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads")
    many = torch.get_num_threads()
    h = SlowHandler()
    w = start_worker(handler=h, lanes=2, max_batch_size=4, window_ms=0)
    assert r.hget(tiny.keys.worker(w.worker.id), "lanes") == b"2"
    assert _client(tiny).post("/v1/models/tiny/predict", data=_solid(60), headers=JPEG).status_code == 200
    assert [n for _, _, n, _ in h.passes] == [many]  # alone: every thread
    _post_at_once_and_check(tiny, [i * 15 for i in range(16)])
    assert sum(h.batch_sizes) == 17 and max(h.batch_sizes) <= 4
    # A pass that started while another ran had a full batch and one thread (the other lane held
    # the other core).
    during = [p for p in h.passes if any(a < p[0] < b for a, b, _, _ in h.passes if (a, b) != p[:2])]
    assert during, f"no two passes overlapped: {h.passes}"
    assert all(n == 1 and size == 4 for _, _, n, size in during), h.passes
    assert "lane-1" in h.lanes  # the second lane did run passes


def test_every_lone_request_runs_on_the_first_lane_with_every_thread(
    tiny: Settings, start_worker: Callable[..., RunningWorker]
) -> None:
    """Lanes do not take turns at lone requests: only the first lane starts OpenMP teams of more
    than one thread (libgomp stops its threads' spinning once it manages more threads than CPUs)."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads")
    many = torch.get_num_threads()
    h = SlowHandler()
    start_worker(handler=h, lanes=2, max_batch_size=4, window_ms=0)
    client = _client(tiny)
    for v in (30, 90, 150, 210):
        assert client.post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG).status_code == 200
    assert [n for _, _, n, _ in h.passes] == [many] * 4
    assert "lane-1" not in h.lanes, h.lanes


def test_a_pass_with_work_waiting_behind_it_runs_on_one_thread_and_leaves_the_other_core_to_the_collector(
    tiny: Settings, start_worker: Callable[..., RunningWorker]
) -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads")
    many = torch.get_num_threads()
    h = SlowHandler()
    start_worker(handler=h, thread_plan=ThreadPlan({1: many, 4: many}), max_batch_size=4, window_ms=0)
    assert _client(tiny).post("/v1/models/tiny/predict", data=_solid(60), headers=JPEG).status_code == 200
    assert [n for _, _, n, _ in h.passes] == [many]  # nothing behind a lone request: the plan's count
    _post_at_once_and_check(tiny, [i * 20 for i in range(12)])
    later = h.passes[1:]
    assert sum(size for _, _, _, size in later) == 12 and len(later) >= 3
    # While a pass ran (0.3 s), the rest arrived: the next passes had frames behind them, in the
    # buffer or still in Redis, and ran on one thread; the last had none and ran on the plan's count.
    assert any(n == 1 for _, _, n, _ in later[:-1]), later
    # Nothing came in during the burst's last pass: a lone request after it gets the plan's count.
    assert _client(tiny).post("/v1/models/tiny/predict", data=_solid(200), headers=JPEG).status_code == 200
    assert h.passes[-1][2] == many, h.passes


def test_a_request_that_came_in_during_a_pass_runs_on_one_thread(
    tiny: Settings, start_worker: Callable[..., RunningWorker]
) -> None:
    """Work arriving while a pass runs keeps the collector busy beside the passes: the next pass
    leaves it the other core, though nothing waits behind that pass when it starts."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads")
    many = torch.get_num_threads()
    h = SlowHandler()
    start_worker(handler=h, thread_plan=ThreadPlan({1: many}), max_batch_size=4, window_ms=0)
    app = create_app(tiny)

    def post(v: int) -> int:
        return app.test_client().post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG).status_code

    with ThreadPoolExecutor(2) as ex:
        first = ex.submit(post, 40)
        assert h.began.wait(5)  # its pass has begun...
        second = ex.submit(post, 80)  # ...and this one comes in during it
        assert (first.result(), second.result()) == (200, 200)
    assert [(n, size) for _, _, n, size in h.passes] == [(many, 1), (1, 1)], h.passes
    assert post(120) == 200  # nothing came in during that pass: all threads again
    assert h.passes[-1][2] == many


def test_a_request_sent_after_the_answer_is_not_counted_as_come_in_during_the_pass(
    tiny: Settings, start_worker: Callable[..., RunningWorker]
) -> None:
    """A lone client's next request can be taken while the lane still waits for Redis to
    acknowledge the replies it sent (here: 0.3 s more); it came in after the pass, and its own pass
    gets the plan's count of threads, as a lone request does."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads")
    many = torch.get_num_threads()
    h = SlowHandler()
    w = start_worker(handler=h, thread_plan=ThreadPlan({1: many}), max_batch_size=4, window_ms=0)
    sent = w.worker.broker.send

    def send_then_stall(*args: Any, **kwargs: Any) -> None:
        sent(*args, **kwargs)  # the replies are in Redis: the client has its answer
        time.sleep(0.3)

    w.worker.broker.send = send_then_stall  # type: ignore[method-assign]
    client = _client(tiny)
    for v in (40, 80, 120):  # each sent as soon as the one before is answered
        assert client.post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG).status_code == 200
    assert [(n, size) for _, _, n, size in h.passes] == [(many, 1)] * 3, h.passes


def _burn(seconds: float) -> None:
    """Hold this thread on the CPU for ``seconds`` of its own CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class CpuHandler(TinyHandler):
    """Preparing an input burns 20 ms of CPU; a pass sleeps 100 ms and burns 10 ms."""

    def prepare(self, inputs: Sequence[TensorData]) -> list[TensorData]:
        for _ in inputs:
            _burn(0.02)
        return list(inputs)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(0.1)
        _burn(0.01)
        return super().forward(batch)


def test_the_stats_show_the_cpu_the_worker_spent_preparing_inputs_and_in_the_model(
    tiny: Settings, r: redis.Redis, start_worker: Callable[..., RunningWorker]
) -> None:
    w = start_worker(handler=CpuHandler(), thread_plan=ThreadPlan({1: 1}), max_batch_size=4, window_ms=0)
    client = _client(tiny)
    for v in (50, 100, 150):
        assert client.post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG).status_code == 200
    for key in (tiny.keys.stats("tiny"), tiny.keys.worker(w.worker.id)):
        got = {k: int(r.hget(key, k) or 0) for k in ("prep_cpu_us", "model_cpu_us")}
        assert 3 * 18_000 <= got["prep_cpu_us"] <= 3 * 40_000, (key, got)
        # CPU, not time: the passes' 100 ms sleeps are not in it
        assert 3 * 9_000 <= got["model_cpu_us"] <= 3 * 50_000, (key, got)


def test_a_poisoned_item_fails_alone_and_the_batch_succeeds(
    tiny: Settings, start_worker: Callable[..., RunningWorker]
) -> None:
    start_worker(max_batch_size=16, window_ms=50)
    app = create_app(tiny)
    values = [40, 80, POISON, 120, 160, 200, 240, 20]

    def one(v: int) -> tuple[int, int, str]:
        resp = app.test_client().post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG)
        body = resp.get_json()
        return v, resp.status_code, body["error"]["code"] if "error" in body else str(body["predictions"][0]["index"])

    with ThreadPoolExecutor(len(values)) as ex:
        results = list(ex.map(one, values))
    for v, status, what in results:
        if v == POISON:
            assert (status, what) == (500, "inference_failed")
        else:
            assert (status, what) == (200, str(expected_top1(v)))


def test_foreign_and_malformed_queue_entries_do_not_stop_the_worker(
    tiny: Settings, r: redis.Redis, start_worker: Callable[..., RunningWorker]
) -> None:
    import msgpack

    q = tiny.keys.queue("tiny")
    r.rpush(q, b"hello from redis-cli", msgpack.packb({"v": 1, "id": "foreign1", "model": "tiny"}))
    start_worker()
    resp = _client(tiny).post("/v1/models/tiny/predict", data=_solid(90), headers=JPEG)
    assert resp.status_code == 200
    _, raw = r.blpop([tiny.keys.reply("foreign1")], timeout=5)
    assert msgpack.unpackb(raw)["error"]["code"] == "bad_frame"
    assert r.llen(q) == 0


@pytest.mark.parametrize(
    "headers,body,status,code",
    [
        ({"Content-Type": "text/plain"}, b"hello", 415, "unsupported_media_type"),
        ({}, b"\xff\xd8", 415, "unsupported_media_type"),
        (JPEG, b"", 400, "invalid_image"),
        (JPEG, b"definitely not a jpeg", 400, "invalid_image"),
        ({"Content-Type": "multipart/form-data; boundary=x"}, b"--x--\r\n", 400, "bad_request"),
    ],
)
def test_bad_uploads_get_clear_4xx_errors(tiny: Settings, headers: dict, body: bytes, status: int, code: str) -> None:
    _fake_registration(tiny)
    resp = _client(tiny).post("/v1/models/tiny/predict", data=body, headers=headers)
    assert resp.status_code == status
    assert resp.get_json()["error"]["code"] == code


@pytest.mark.parametrize("topk", ["0", "101", "abc", "-1", "2.5"])
def test_bad_topk_is_400(tiny: Settings, topk: str) -> None:
    _fake_registration(tiny)
    resp = _client(tiny).post(f"/v1/models/tiny/predict?topk={topk}", data=make_image(1), headers=JPEG)
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "bad_request"


def test_body_and_pixel_limits_are_413(tiny: Settings) -> None:
    _fake_registration(tiny)
    small_body = _client(tiny.replace(max_body_bytes=1000))
    resp = small_body.post("/v1/models/tiny/predict", data=make_image(1, (640, 480)), headers=JPEG)
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "payload_too_large"
    few_pixels = _client(tiny.replace(max_image_pixels=10_000))
    resp = few_pixels.post("/v1/models/tiny/predict", data=make_image(1, (640, 480)), headers=JPEG)
    assert resp.status_code == 413 and "pixels" in resp.get_json()["error"]["message"]


def test_unknown_route_and_method_are_json(tiny: Settings) -> None:
    client = _client(tiny)
    assert client.get("/nope").get_json()["error"]["code"] == "not_found"
    resp = client.get("/v1/models/tiny/predict")
    assert resp.status_code == 405 and "error" in resp.get_json()


def test_readiness_and_model_listing_follow_live_workers(
    tiny: Settings, r: redis.Redis, start_worker: Callable[..., RunningWorker]
) -> None:
    client = _client(tiny.replace(model_cache_s=0.0))
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    assert client.get("/v1/models").get_json() == {"models": []}
    w = start_worker(max_batch_size=12)
    wait_registered(r, tiny)
    assert client.get("/readyz").status_code == 200
    (model,) = client.get("/v1/models").get_json()["models"]
    assert model["name"] == "tiny" and model["max_batch_size"] == 12 and model["live_workers"] == 1
    assert model["input"]["shape"] == [8, 8, 3]
    w.stop()  # a stopped worker unregisters
    assert client.get("/readyz").status_code == 503


def test_redis_down_is_a_fast_503(tiny: Settings) -> None:
    s = tiny.replace(redis_url="redis://127.0.0.1:1/0")
    client = _client(s)
    t0 = time.monotonic()
    resp = client.post("/v1/models/tiny/predict", data=make_image(1), headers=JPEG)
    assert resp.status_code == 503 and resp.headers["Retry-After"]
    assert time.monotonic() - t0 < 3
    assert client.get("/readyz").status_code == 503


def test_full_queue_is_503_with_retry_after_at_once(tiny: Settings, r: redis.Redis) -> None:
    s = tiny.replace(max_queue_length=2, request_timeout_s=3.0)
    _fake_registration(s)
    client = _client(s)
    short = {**JPEG, "X-Request-Timeout-Ms": "100"}
    codes = [client.post("/v1/models/tiny/predict", data=make_image(i), headers=short).status_code for i in range(2)]
    assert codes == [504, 504]
    for i in range(3):  # refused without waiting out the 3 s deadline, again and again
        t0 = time.monotonic()
        resp = client.post("/v1/models/tiny/predict", data=make_image(i), headers=JPEG)
        assert resp.status_code == 503 and resp.headers["Retry-After"]
        assert resp.get_json()["error"]["code"] == "queue_full"
        assert time.monotonic() - t0 < 1.5
    assert r.llen(s.keys.queue("tiny")) == 2
    assert not r.keys(s.keys.reply("*"))  # the refusals' answers were read, nothing left behind


def test_api_keys_guard_v1_routes_but_not_probes(tiny: Settings, start_worker: Callable[..., RunningWorker]) -> None:
    start_worker()
    client = _client(tiny.replace(api_keys="k-one, k-two"))
    url = "/v1/models/tiny/predict"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k-one"}, {"Authorization": "k-one"}):
        resp = client.post(url, data=_solid(50), headers={**JPEG, **headers})
        assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/v1/models").status_code == 401
    for key in ("k-one", "k-two"):
        resp = client.post(url, data=_solid(50), headers={**JPEG, "Authorization": f"Bearer {key}"})
        assert resp.status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_client_can_shorten_its_deadline_but_not_extend_it(tiny: Settings) -> None:
    s = tiny.replace(request_timeout_s=1.0)
    _fake_registration(s)
    client = _client(s)
    t0 = time.monotonic()
    resp = client.post("/v1/models/tiny/predict", data=_solid(1), headers={**JPEG, "X-Request-Timeout-Ms": "200"})
    assert resp.status_code == 504 and time.monotonic() - t0 < 0.8
    t0 = time.monotonic()
    resp = client.post("/v1/models/tiny/predict", data=_solid(1), headers={**JPEG, "X-Request-Timeout-Ms": "60000"})
    assert resp.status_code == 504 and 0.9 < time.monotonic() - t0 < 2.0
    for bad in ("0", "-5", "soon"):
        resp = client.post("/v1/models/tiny/predict", data=_solid(1), headers={**JPEG, "X-Request-Timeout-Ms": bad})
        assert resp.status_code == 400


def test_settings_never_show_secrets() -> None:
    s = Settings(redis_url="rediss://user:hunter2@redis.example:6380/0", api_keys="sekret")
    text = repr(s)
    assert "hunter2" not in text and "sekret" not in text and "redis.example:6380" in text


def test_out_of_memory_splits_the_batch_and_lowers_the_cap(
    tiny: Settings, r: redis.Redis, start_worker: Callable[..., RunningWorker]
) -> None:
    w = start_worker(handler=OomHandler(), max_batch_size=16, window_ms=100)
    app = create_app(tiny)

    def one(v: int) -> tuple[int, int, int]:
        resp = app.test_client().post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG)
        body = resp.get_json()
        return v, resp.status_code, body["predictions"][0]["index"] if resp.status_code == 200 else -1

    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(one, [i * 20 for i in range(12)]))
    assert all(status == 200 and idx == expected_top1(v) for v, status, idx in results)
    assert w.worker.batch_cap <= OomHandler.fits and w.thread.is_alive()
    assert max(w.handler.batch_sizes) <= OomHandler.fits
    deadline = time.monotonic() + 5
    while int(r.hget(tiny.keys.worker(w.worker.id), "batch_cap") or 0) != w.worker.batch_cap:
        assert time.monotonic() < deadline  # the heartbeat publishes the lowered cap
        time.sleep(0.05)


def test_padded_batches_answer_only_the_real_items(tiny: Settings, start_worker: Callable[..., RunningWorker]) -> None:
    w = start_worker(max_batch_size=8, window_ms=30, batch_buckets="on")
    app = create_app(tiny)
    values = [10, 60, 110, 160, 210]

    def one(v: int) -> tuple[int, int, int]:
        body = app.test_client().post("/v1/models/tiny/predict", data=_solid(v), headers=JPEG).get_json()
        return v, body["predictions"][0]["index"], body["batch_size"]

    with ThreadPoolExecutor(len(values)) as ex:
        results = list(ex.map(one, values))
    assert all(idx == expected_top1(v) for v, idx, _ in results)
    assert set(w.handler.batch_sizes) <= {1, 2, 4, 8}  # the model only ever saw bucket shapes
    reported = [bs for _, _, bs in results]  # batch_size counts real requests, never the padding
    assert max(reported) <= len(values) and max(w.handler.batch_sizes) >= max(reported)


def test_x_priority_picks_the_list_and_bad_values_are_400(tiny: Settings, r: redis.Redis) -> None:
    s = tiny.replace(request_timeout_s=0.2)
    _fake_registration(s)
    client = _client(s)
    for prio in ("high", "low", "HIGH"):
        assert (
            client.post("/v1/models/tiny/predict", data=_solid(1), headers={**JPEG, "X-Priority": prio}).status_code
            == 504
        )
    assert r.llen(s.keys.queue("tiny", "high")) == 2 and r.llen(s.keys.queue("tiny", "low")) == 1
    assert decode_request(r.lindex(s.keys.queue("tiny", "low"), 0)).params["priority"] == "low"
    resp = client.post("/v1/models/tiny/predict", data=_solid(1), headers={**JPEG, "X-Priority": "urgent"})
    assert resp.status_code == 400 and "priority must be one of" in resp.get_json()["error"]["message"]


@pytest.mark.parametrize("priority,lst", [("high", "high"), (1, "high"), (0, "normal"), ("LOW", "low"), (3, "low")])
def test_v2_priority_parameter_picks_the_list(tiny: Settings, r: redis.Redis, priority: object, lst: str) -> None:
    import base64

    s = tiny.replace(request_timeout_s=0.2)
    _fake_registration(s)
    body = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(_solid(5)).decode()]}
        ],
        "parameters": {"priority": priority},
    }
    resp = _client(s).post("/v2/models/tiny/infer", json=body)
    assert resp.status_code == 504
    assert r.llen(s.keys.queue("tiny", lst)) == 1


def test_v2_bad_priority_is_400(tiny: Settings) -> None:
    _fake_registration(tiny)
    body = {
        "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
        "parameters": {"priority": "vip"},
    }
    assert _client(tiny).post("/v2/models/tiny/infer", json=body).status_code == 400


class BatchPreparingHandler(TinyHandler):
    """Prepares whole takes in one call, as the image handler does on CUDA (nvjpeg decodes a list
    at once), and, like that call, fails as a whole when one input in it is bad."""

    prepares_batches = True
    bad = 7  # an input whose first pixel is this value cannot be prepared

    def __init__(self) -> None:
        super().__init__()
        self.prepare_calls: list[int] = []

    def prepare(self, inputs: Sequence[TensorData]) -> list[TensorData]:
        self.prepare_calls.append(len(inputs))
        if any(t.data[0] == self.bad for t in inputs):
            raise InvalidImage("the JPEG cannot be decoded")
        return list(inputs)


def test_a_take_prepared_in_one_call_answers_every_frame_and_only_the_bad_one_fails(
    tiny: Settings, r: redis.Redis, start_worker: Callable[..., RunningWorker]
) -> None:
    values = [40, 80, BatchPreparingHandler.bad, 120, 160, 200]
    enqueuer = Enqueuer(r, tiny.keys)
    for i, v in enumerate(values):  # queued before the worker starts: its first take holds them all
        shape = TinyHandler.spec.shape
        frame = Request(f"batched{i}", "tiny", now_ms() + 10_000, TensorData("uint8", shape, bytes([v]) * (8 * 8 * 3)))
        assert enqueuer.push("tiny", encode_request(frame), "normal", 100) >= 0
    handler = BatchPreparingHandler()
    w = start_worker(handler, max_batch_size=16)
    for i, v in enumerate(values):
        got = r.blpop([tiny.keys.reply(f"batched{i}")], timeout=5)
        assert got is not None, f"no reply for input {v}"
        reply = decode_reply(got[1])
        if v == BatchPreparingHandler.bad:
            assert not reply.ok and reply.error is not None and reply.error["code"] == "invalid_image"
        else:
            assert reply.ok and reply.result is not None and reply.result["indices"][0] == expected_top1(v)
    # one call for the whole take, then each input alone to find the bad one
    assert handler.prepare_calls == [len(values)] + [1] * len(values)
    assert r.llen(tiny.keys.inflight(w.worker.id)) == 0
