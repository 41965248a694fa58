"""``redbatch top`` on a real Redis with a real worker: what it shows is what the deployment does."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable

import redis
from flask.testing import FlaskClient

from api.app import create_app
from common.config import Settings
from common.top import read_snapshot, run
from tests.conftest import make_image
from tests.integration.conftest import RunningWorker


def _row(screen: str, first: str) -> list[str]:
    rows = [ln.split() for ln in screen.splitlines() if ln.split()[:1] == [first]]
    assert len(rows) == 1, screen
    return rows[0]


def _traffic(client: FlaskClient, stop: threading.Event, done: list[int]) -> None:
    image = make_image(3)
    while not stop.is_set():
        resp = client.post("/v1/models/tiny/predict", data=image, headers={"Content-Type": "image/jpeg"})
        assert resp.status_code == 200, resp.get_json()
        done.append(1)


def test_top_once_shows_the_worker_queues_and_request_rate(
    settings: Settings, start_worker: Callable[..., RunningWorker], r: redis.Redis
) -> None:
    w = start_worker(max_batch_size=8)
    r.rpush(settings.keys.queue("unserved"), b"a", b"b", b"c")  # nobody takes these

    stop, done = threading.Event(), list[int]()
    # The apps are made here, one after the other: werkzeug compiles their routes with ast.parse,
    # which CPython 3.11 does not run safely from several threads at once ("AST constructor
    # recursion depth mismatch", seen once in CI, which killed a client thread).
    apps = [create_app(settings.replace(request_timeout_s=5.0)).test_client() for _ in range(4)]
    clients = [threading.Thread(target=_traffic, args=(app, stop, done)) for app in apps]
    for t in clients:
        t.start()
    out = io.StringIO()
    try:
        assert run(settings, interval_s=1.0, once=True, out=out) == 0
    finally:
        stop.set()
        for t in clients:
            t.join(10)
    screen = out.getvalue()
    assert "\x1b" not in screen  # --once prints a plain screen, for scripts and tests

    worker_row = _row(screen, w.worker.id)
    assert worker_row[1:6] == ["tiny", "cpu", "float32", "8", "1"]  # model, device, dtype, batch size, lanes
    assert float(worker_row[7]) > 0  # requests per second

    tiny = _row(screen, "tiny")
    assert tiny[1] == "1"  # one live worker
    requests_per_s, mean_batch = float(tiny[4]), tiny[7]
    assert requests_per_s > 5, screen  # 4 clients for 1 s against a worker that answers in ms
    assert mean_batch != "-" and 1.0 <= float(mean_batch) <= 8.0
    assert _row(screen, "unserved")[:3] == ["unserved", "0", "3"]
    assert len(done) > 0


def test_snapshot_counts_in_flight_frames_and_unread_replies(settings: Settings, r: redis.Redis) -> None:
    keys = settings.keys
    r.rpush(keys.inflight("gone"), b"x", b"y")
    r.rpush(keys.queue("m"), b"1")
    r.set(keys.reply("abc"), b"z", px=10_000)
    r.set(settings.prefix + "x:queue:other", b"not ours")  # another prefix that starts the same way
    snap = read_snapshot(r, keys)
    assert snap.inflight == {"gone": 2}
    assert snap.queues == {"m": 1}
    assert snap.replies == 1 and snap.workers == []


def test_the_cli_reads_settings_from_the_environment_and_never_imports_torch(
    settings: Settings, start_worker: Callable[..., RunningWorker], r: redis.Redis
) -> None:
    w = start_worker()
    r.rpush(settings.keys.queue("unserved"), b"a", b"b")
    env = {**os.environ, "REDBATCH_REDIS_URL": settings.redis_url, "REDBATCH_PREFIX": settings.prefix}
    code = (
        "import sys\nfrom common.cli import main\n"
        "rc = main(['top', '--once', '--interval-s', '0.2'])\n"
        "assert 'torch' not in sys.modules, 'top imported torch'\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"prefix {settings.prefix}" in proc.stdout
    assert _row(proc.stdout, "unserved")[:3] == ["unserved", "0", "2"]
    assert _row(proc.stdout, w.worker.id)[1:5] == ["tiny", "cpu", "float32", "32"]


def test_the_cli_says_when_redis_does_not_answer() -> None:
    env = {**os.environ, "REDBATCH_REDIS_URL": "redis://127.0.0.1:1/0"}
    cmd = [sys.executable, "-m", "common.cli", "top", "--once"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "does not answer" in proc.stderr
