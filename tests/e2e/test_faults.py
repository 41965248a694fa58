"""The failure-semantics table, each row injected for real: kill -9, SIGTERM, Redis restarts, floods,
hostile bodies. Every request sent is accounted for: a correct answer or the documented error."""

from __future__ import annotations

import os
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest
import redis
import requests
import torch

from tests.conftest import RedisServer, make_image
from tests.e2e.conftest import Service
from tests.e2e.load import Load, Outcome
from tests.e2e.test_e2e import reference_scores

pytestmark = pytest.mark.e2e

FAST_FAILOVER = {"--worker-ttl-s": "2", "--heartbeat-s": "0.5"}
TIMEOUT_ENV = {"REDBATCH_REQUEST_TIMEOUT_S": "20"}


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [make_image(500 + i, (320, 240)) for i in range(32)]


@pytest.fixture(scope="module")
def reference(weights_file: Path, images: list[bytes]) -> torch.Tensor:
    return reference_scores(weights_file, images)


def _service(redis_url: str, weights: Path, tmp_path: Path, workers: int = 1, **flags: str) -> Service:
    svc = Service(redis_url, weights, tmp_path, env=TIMEOUT_ENV, workers=workers, **{**FAST_FAILOVER, **flags})
    svc.wait_ready()
    return svc


def _check_answers(outcomes: list[Outcome], reference: torch.Tensor, timeout_s: float = 20.0) -> dict[str, int]:
    """Every outcome is the model's correct answer for its own image, or a 504 after the deadline."""
    counts = {"sent": len(outcomes), "ok": 0, "504": 0}
    for o in outcomes:
        if o.status == 200:
            top = o.body["predictions"][0]
            assert abs(top["score"] - reference[o.client, top["index"]].item()) <= 0.01, o
            counts["ok"] += 1
        else:
            assert o.status == 504 and o.latency_s >= timeout_s * 0.9, o
            counts["504"] += 1
    return counts


def _inflight(r: redis.Redis, prefix: str) -> int:
    return sum(r.llen(k) for k in r.scan_iter(match=f"{prefix}:inflight:*"))


def _wait_inflight(r: redis.Redis, prefix: str, timeout_s: float = 20) -> int:
    """Wait until some worker holds frames it has not answered yet (so a kill lands mid-batch)."""
    deadline = time.monotonic() + timeout_s
    while (n := _inflight(r, prefix)) == 0:
        assert time.monotonic() < deadline, "no frames in flight under load"
        time.sleep(0.005)
    return n


def _no_reply_key_without_ttl(r: redis.Redis, prefix: str) -> None:
    for k in r.scan_iter(match=f"{prefix}:reply:*"):
        assert r.pttl(k) > 0, k


def test_kill_9_mid_batch_then_restart_loses_nothing(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path, images: list[bytes], reference: torch.Tensor
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    svc = _service(redis_server.url, weights_file, tmp_path)
    try:
        load = Load(svc.predict_url(), images, requests_per_client=8)
        finish = load.run_in_background()
        held = _wait_inflight(r, svc.prefix)  # at once: 256 requests take about a second now
        svc.worker.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        svc.worker.wait()
        svc.workers.append(svc.start_worker())
        outcomes = finish()
        counts = _check_answers(outcomes, reference)
        recovered = [o.sent_s + o.latency_s - killed_at for o in outcomes if o.sent_s < killed_at and o.status == 200]
        print(f"\nkill -9 with {held} frames in flight: {counts}, last pre-kill request answered "
              f"{max(recovered):.1f}s after the kill")  # fmt: skip
        assert counts["sent"] == 32 * 8 and not [o for o in outcomes if o.status == 0]
        assert _inflight(r, svc.prefix) == 0
        _no_reply_key_without_ttl(r, svc.prefix)
    finally:
        svc.stop()


def test_a_peer_takes_over_a_killed_workers_inflight_frames(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path, images: list[bytes], reference: torch.Tensor
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    svc = _service(redis_server.url, weights_file, tmp_path, workers=2)
    try:
        load = Load(svc.predict_url(), images, requests_per_client=8)
        finish = load.run_in_background()
        victim = svc.workers[0]
        victim_key = next(
            k for k in r.scan_iter(match=f"{svc.prefix}:worker:*") if r.hget(k, "pid") == str(victim.pid).encode()
        )
        victim_inflight = victim_key.replace(b":worker:", b":inflight:")
        deadline = time.monotonic() + 20
        while r.llen(victim_inflight) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        victim.send_signal(signal.SIGKILL)
        outcomes = finish()
        counts = _check_answers(outcomes, reference)
        assert counts["ok"] == counts["sent"] == 32 * 8  # the peer answered everything, well within deadlines
        assert r.llen(victim_inflight) == 0
    finally:
        svc.stop()


def test_sigterm_under_load_loses_nothing(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path, images: list[bytes], reference: torch.Tensor
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    svc = _service(redis_server.url, weights_file, tmp_path, workers=2)
    try:
        load = Load(svc.predict_url(), images, requests_per_client=8)
        finish = load.run_in_background()
        _wait_inflight(r, svc.prefix)
        svc.workers[0].send_signal(signal.SIGTERM)
        assert svc.workers[0].wait(30) == 0
        outcomes = finish()
        counts = _check_answers(outcomes, reference)
        assert counts["ok"] == counts["sent"] == 32 * 8
    finally:
        svc.stop()


def test_two_lanes_answer_every_image_correctly_and_a_sigterm_under_load_loses_nothing(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path, images: list[bytes], reference: torch.Tensor
) -> None:
    """Two forward passes at once through the real model (one torch thread each, or two for a pass
    alone) give each image its own answer, and a stop finishes every lane's batch."""
    r = redis.Redis.from_url(redis_server.url)
    lanes = {"--torch-threads": "2", "--lanes": "2", "--max-batch-size": "4"}
    svc = _service(redis_server.url, weights_file, tmp_path, workers=2, **lanes)
    try:
        for k in r.scan_iter(match=f"{svc.prefix}:worker:*"):
            assert r.hget(k, "lanes") == b"2"
        load = Load(svc.predict_url(), images, requests_per_client=8)
        finish = load.run_in_background()
        _wait_inflight(r, svc.prefix)
        svc.workers[0].send_signal(signal.SIGTERM)
        assert svc.workers[0].wait(30) == 0
        counts = _check_answers(finish(), reference)
        assert counts["ok"] == counts["sent"] == 32 * 8
    finally:
        svc.stop()


def test_gunicorn_drains_requests_in_flight_on_sigterm(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path, images: list[bytes], reference: torch.Tensor
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    svc = _service(redis_server.url, weights_file, tmp_path, **{"--max-batch-size": "1"})
    try:
        load = Load(svc.predict_url(), images * 2, requests_per_client=1)
        finish = load.run_in_background()
        stats, queue = f"{svc.prefix}:stats:mobilenet_v3_small", f"{svc.prefix}:queue:mobilenet_v3_small"
        deadline = time.monotonic() + 20
        while r.llen(queue) + int(r.hget(stats, "requests") or 0) < 64:  # all 64 accepted and enqueued
            assert time.monotonic() < deadline, (r.llen(queue), r.hgetall(stats), len(load.outcomes))
            time.sleep(0.005)
        svc.api.send_signal(signal.SIGTERM)
        answered_before = len(load.outcomes)
        outcomes = finish()
        assert answered_before < 64, "the worker answered everything before the signal: nothing was drained"
        assert _check_answers(outcomes, reference[[*range(32), *range(32)]])["ok"] == 64
        assert svc.api.wait(30) == 0
    finally:
        svc.stop()


def test_redis_restart_under_load_503s_then_recovers_without_restarts(
    weights_file: Path, tmp_path: Path, images: list[bytes], reference: torch.Tensor
) -> None:
    own = RedisServer()
    own.start()
    svc = _service(own.url, weights_file, tmp_path)
    try:
        load = Load(svc.predict_url(), images[:16], client_timeout_s=30)
        finish = load.run_in_background()
        time.sleep(1.0)
        own.stop()
        down_at = time.monotonic()
        time.sleep(2.0)
        own.start()
        up_at = time.monotonic()
        deadline = up_at + 30
        while not [o for o in list(load.outcomes) if o.sent_s > up_at and o.status == 200]:
            assert time.monotonic() < deadline, "service did not come back"
            time.sleep(0.05)
        back_s = min(o.sent_s + o.latency_s for o in load.outcomes if o.sent_s > up_at and o.status == 200) - up_at
        time.sleep(2.0)
        load.stop.set()
        outcomes = finish()
        during = [o for o in outcomes if down_at + 0.5 < o.sent_s < up_at - 0.2]
        assert during and all(o.status == 503 for o in during), {o.status for o in during}
        assert all(o.latency_s < 3.0 for o in during)  # fast, not stuck
        assert all(o.retry_after for o in during)
        late = [o for o in outcomes if o.sent_s > up_at + back_s + 1.5]
        assert late and all(o.status == 200 for o in late), {o.status for o in late}
        _check_answers([o for o in outcomes if o.status == 200], reference)
        assert svc.api.poll() is None and svc.worker.poll() is None  # nothing was restarted
        print(f"\nRedis down 2 s: {len(during)} fast 503s; full service {back_s:.2f}s after it came back")
    finally:
        svc.stop()
        own.stop()


def test_a_flood_beyond_the_queue_bound_is_503_and_redis_memory_stays_bounded(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path, images: list[bytes]
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    svc = Service(redis_server.url, weights_file, tmp_path,
                  env={"REDBATCH_MAX_QUEUE_LENGTH": "8", **TIMEOUT_ENV}, **{"--max-batch-size": "2"})  # fmt: skip
    svc.wait_ready()
    try:
        base = int(r.info("memory")["used_memory"])
        load = Load(svc.predict_url(), images * 2)  # 64 clients
        finish = load.run_in_background()
        peak, t_end = base, time.monotonic() + 4
        while time.monotonic() < t_end:
            peak = max(peak, int(r.info("memory")["used_memory"]))
            assert r.llen(f"{svc.prefix}:queue:mobilenet_v3_small") <= 8
            time.sleep(0.05)
        load.stop.set()
        outcomes = finish()
        full = [o for o in outcomes if o.status == 503]
        assert full and all(o.body["error"]["code"] == "queue_full" and o.retry_after for o in full)
        assert {o.status for o in outcomes} <= {200, 503}
        assert peak - base < 16 * 1024 * 1024  # 8 queued frames of 150 KB, not 64+
        resp = requests.post(svc.predict_url(), data=images[0], headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert resp.status_code == 200
        print(f"\nflood: {len(outcomes)} requests, {len(full)} answered 503; Redis grew {(peak - base) / 1e6:.1f} MB")
    finally:
        svc.stop()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` by ``height`` pixels in a few dozen bytes (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_every_hostile_input_is_a_4xx_and_the_service_still_answers_correctly(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path, images: list[bytes], reference: torch.Tensor
) -> None:
    svc = Service(redis_server.url, weights_file, tmp_path, env={"REDBATCH_MAX_BODY_BYTES": str(4 * 1024 * 1024)})
    svc.wait_ready()
    url = svc.predict_url()
    jpeg = {"Content-Type": "image/jpeg"}
    good = images[0]
    cases: list[tuple[str, str, dict[str, str], bytes, int]] = [
        ("empty body", url, jpeg, b"", 400),
        ("truncated jpeg", url, jpeg, good[: len(good) // 3], 400),
        ("random bytes", url, jpeg, os.urandom(5000), 400),
        ("text as an image", url, jpeg, b"this is a cat, trust me", 400),
        ("decompression bomb", url, {"Content-Type": "image/png"}, _png_header_only(60000, 60000), 413),
        ("huge body", url, jpeg, b"\xff" * (5 * 1024 * 1024), 413),
        ("wrong content type", url, {"Content-Type": "application/json"}, good, 415),
        ("missing content type", url, {}, good, 415),
        ("topk zero", url + "?topk=0", jpeg, good, 400),
        ("topk text", url + "?topk=five", jpeg, good, 400),
        ("unknown model", url.replace("mobilenet_v3_small", "no_such_model"), jpeg, good, 404),
        ("multipart without image", url, {"Content-Type": "multipart/form-data; boundary=b"}, b"--b--\r\n", 400),
        ("bad timeout header", url, {**jpeg, "X-Request-Timeout-Ms": "-1"}, good, 400),
    ]
    try:
        for name, u, headers, body, status in cases:
            resp = requests.post(u, data=body, headers=headers, timeout=30)
            assert resp.status_code == status, (name, resp.status_code, resp.text[:200])
            assert resp.json()["error"]["code"], name
        for mode, fmt in (("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("P", "WEBP")):
            resp = requests.post(url, data=make_image(2, (100, 80), fmt, mode), headers=jpeg, timeout=30)
            assert resp.status_code == 200, (mode, resp.text)
        resp = requests.post(url, data=good, headers=jpeg, timeout=30)
        top = resp.json()["predictions"][0]
        assert abs(top["score"] - reference[0, top["index"]].item()) <= 0.01
        assert svc.api.poll() is None and svc.worker.poll() is None
    finally:
        svc.stop()
