"""/metrics through the real gunicorn (2 processes, multiprocess mode) and on a worker's own port."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RedisServer, free_port, make_image
from tests.e2e.conftest import ARCH, ROOT, Service

pytestmark = pytest.mark.e2e
N = 24
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = requests.get(url, timeout=5)
    assert resp.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def leave_stale_counts(path: Path) -> None:
    """What a previous run leaves behind: 1000 answered requests that this run must not report."""
    code = f"from api import metrics; metrics.REQUESTS.labels({ARCH!r}, '200').inc(1000)"
    env = {**os.environ, MULTIPROC_ENV: str(path)}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=60)
    assert list(path.glob("counter_*.db"))


def test_the_api_reports_every_process_and_the_worker_its_own_port(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    leave_stale_counts(metrics_dir)
    port = free_port()
    svc = Service(redis_server.url, weights_file, tmp_path, env={MULTIPROC_ENV: str(metrics_dir)}, workers=0,
                  **{"--metrics-port": str(port)})  # fmt: skip
    try:
        svc.env.pop(MULTIPROC_ENV)  # the API's only: the worker is one process with a port of its own
        svc.workers.append(svc.start_worker())
        svc.wait_ready()

        def predict(image: bytes) -> int:
            headers = {"Content-Type": "image/jpeg"}
            return requests.post(svc.predict_url(), data=image, headers=headers, timeout=30).status_code

        with ThreadPoolExecutor(8) as ex:
            assert list(ex.map(predict, [make_image(i) for i in range(N)])) == [200] * N

        # Both gunicorn processes keep their values in the shared directory (the stale files are gone) ...
        pids = {f.stem.rsplit("_", 1)[1] for f in metrics_dir.glob("gauge_livesum_*.db")}
        assert len(pids) == 2, sorted(f.name for f in metrics_dir.iterdir())
        # ... and a scrape adds up all of them, whichever process answers it.
        for _ in range(8):
            api = scrape(svc.url + "/metrics")
            assert value(api, "redbatch_requests_total", model=ARCH, code="200") == N
            assert value(api, "redbatch_request_duration_seconds_count", model=ARCH) == N
            assert value(api, "redbatch_requests_in_progress") == 0

        worker = scrape(f"http://127.0.0.1:{port}/metrics")
        executions = value(worker, "redbatch_execution_count_total", model=ARCH)
        assert value(worker, "redbatch_inference_count_total", model=ARCH) == N
        assert 1 <= executions < N  # 8 concurrent clients share forward passes
        assert value(worker, "redbatch_batch_size_count", model=ARCH) == executions
        assert value(worker, "redbatch_batch_size_sum", model=ARCH) == N
        assert value(worker, "redbatch_compute_duration_seconds_count", model=ARCH) == executions
        assert value(worker, "redbatch_queue_duration_seconds_count", model=ARCH) == N
        assert value(worker, "redbatch_worker_up", model=ARCH) == 1
        assert value(worker, "redbatch_inflight_requests", model=ARCH) == 0
        for priority in ("high", "normal", "low"):
            assert ("redbatch_queue_length", frozenset({"model": ARCH, "priority": priority}.items())) in worker
    finally:
        svc.stop()
