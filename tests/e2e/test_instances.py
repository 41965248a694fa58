"""``redbatch worker --instances N``: N worker processes under one supervisor, through the real stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisServer, free_port, make_image
from tests.e2e.conftest import ARCH, ROOT, Service
from tests.e2e.load import Load
from tests.e2e.test_e2e import reference_scores
from tests.e2e.test_faults import FAST_FAILOVER, TIMEOUT_ENV, _check_answers
from tests.e2e.test_metrics_e2e import scrape, value

pytestmark = pytest.mark.e2e


def _instance_pids(r: redis.Redis, prefix: str) -> set[int]:
    """The pids of the workers registered under ``prefix`` (a dead one's stays until its TTL)."""
    pids = (r.hget(k, "pid") for k in r.scan_iter(match=f"{prefix}:worker:*"))
    return {int(p) for p in pids if p}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_instances_share_the_queue_a_killed_one_is_replaced_and_sigterm_stops_them_all(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path
) -> None:
    images = [make_image(700 + i, (320, 240)) for i in range(16)]
    reference = reference_scores(weights_file, images)
    r = redis.Redis.from_url(redis_server.url)
    port = free_port()
    flags = {**FAST_FAILOVER, "--instances": "2", "--metrics-port": str(port)}
    svc = Service(redis_server.url, weights_file, tmp_path, env=TIMEOUT_ENV, **flags)
    supervisor, metrics_url = svc.worker, f"http://127.0.0.1:{port}/metrics"
    try:
        svc.wait_ready(workers=2)
        first = _instance_pids(r, svc.prefix)
        assert len(first) == 2 and supervisor.pid not in first  # two processes, neither the supervisor

        # One metrics port for both: their counts added up, as each instance's own counters in Redis say
        _check_answers(Load(svc.predict_url(), images, requests_per_client=4).run_in_background()(), reference)
        items = [int(r.hget(k, "items") or 0) for k in r.scan_iter(match=f"{svc.prefix}:worker:*")]
        assert sorted(items)[0] > 0 and sum(items) == 16 * 4  # both instances answered some
        m = scrape(metrics_url)
        assert value(m, "redbatch_inference_count_total", model=ARCH) == 16 * 4
        assert value(m, "redbatch_worker_up", model=ARCH) == 2
        assert value(m, "redbatch_inflight_requests", model=ARCH) == 0

        load = Load(svc.predict_url(), images, requests_per_client=12)
        finish = load.run_in_background()
        victim = min(first)
        victim_inflight = next(
            k.replace(b":worker:", b":inflight:")
            for k in r.scan_iter(match=f"{svc.prefix}:worker:*")
            if r.hget(k, "pid") == str(victim).encode()
        )
        deadline = time.monotonic() + 20
        while r.llen(victim_inflight) == 0:  # so the kill lands with frames in its hands
            assert time.monotonic() < deadline, "the instance never took a batch"
            time.sleep(0.002)
        os.kill(victim, signal.SIGKILL)
        counts = _check_answers(finish(), reference)
        assert counts["ok"] == counts["sent"] == 16 * 12  # the other instance answered its frames too
        assert r.llen(victim_inflight) == 0

        deadline = time.monotonic() + 120
        while not (_instance_pids(r, svc.prefix) - first):  # the supervisor started a new instance
            assert supervisor.poll() is None, "the supervisor exited when one instance died"
            assert time.monotonic() < deadline, "no instance replaced the killed one"
            time.sleep(0.2)
        live = {p for p in _instance_pids(r, svc.prefix) if _alive(p)}
        assert len(live) == 2 and victim not in live
        time.sleep(1.0)  # the new instance sets its gauge a Redis round trip after it registers
        assert value(scrape(metrics_url), "redbatch_worker_up", model=ARCH) == 2  # the dead one left the sum

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(60) == 0
        assert not [p for p in live if _alive(p)]  # no instance outlives its supervisor
    finally:
        svc.stop()


def test_an_instance_that_cannot_start_stops_them_all_at_once(redis_server: RedisServer) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "worker", "--instances", "2", "--model", "no_such_module:factory",
         "--device", "cpu", "--redis-url", redis_server.url],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr  # the worker's "could not start" status, not a restart loop
    assert "cannot import 'no_such_module:factory'" in proc.stderr
    assert proc.stderr.count("started (pid") == 2, proc.stderr  # neither was started again
    assert "could not start" in proc.stderr
