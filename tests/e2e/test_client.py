"""The Python client and ``redbatch predict`` against a real service, and the client's retries
against a stub server whose every answer is scripted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common.client import Client, Prediction, RetryPolicy
from common.errors import DeadlineExceeded, InvalidImage, ModelNotFound, QueueFull, Unavailable
from tests.conftest import free_port, make_image
from tests.e2e.conftest import ARCH, ROOT, Service

pytestmark = pytest.mark.e2e


# ---- against the real service -----------------------------------------------------------------


def test_predict_returns_the_services_answer(service: Service, tmp_path: Path) -> None:
    with Client(service.url) as client:
        p = client.predict(make_image(1), ARCH, topk=3)
        assert isinstance(p, Prediction) and p.model == ARCH and len(p.id) == 32
        assert len(p.predictions) == 3
        scores = [s.score for s in p.predictions]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        assert all(isinstance(s.label, str) and 0 <= s.index < 1000 for s in p.predictions)
        assert p.batch_size is not None and p.batch_size >= 1 and p.infer_ms is not None
        # where its time went, from the service's Server-Timing, within this client's own time
        assert list(p.timing) == ["api", "queue", "prep", "batch", "infer"] and p.timing["infer"] == p.infer_ms
        assert p.total_ms is not None and p.http_ms is not None and p.http_ms > 0
        assert all(ms >= 0 for ms in p.timing.values()) and sum(p.timing.values()) < p.total_ms

        path = tmp_path / "cat.jpg"
        path.write_bytes(make_image(1))
        from_file = client.predict(path, ARCH, topk=3)
        assert [s.index for s in from_file.predictions] == [s.index for s in p.predictions]

        assert client.ready()
        assert [m["name"] for m in client.models()] == [ARCH]


def test_errors_come_back_as_the_services_exceptions(service: Service) -> None:
    with Client(service.url) as client:
        with pytest.raises(InvalidImage):
            client.predict(b"not an image at all", ARCH)
        with pytest.raises(ModelNotFound):
            client.predict(make_image(1), "no-such-model")
        with pytest.raises(DeadlineExceeded):
            client.predict(make_image(1), ARCH, timeout_ms=1)  # shorter than any forward pass
        assert client.predict(make_image(2), ARCH).predictions  # the connection is still usable


def test_one_connection_per_thread_is_kept_alive(service: Service) -> None:
    with Client(service.url) as client:
        ports = set()
        for seed in range(5):
            client.predict(make_image(seed), ARCH, topk=1)
            sock = client._local.conn.sock
            ports.add(sock.getsockname()[1])
        assert len(ports) == 1

        def work(seed: int) -> int:
            return len(client.predict(make_image(seed), ARCH, topk=2).predictions)

        with ThreadPoolExecutor(8) as pool:  # a shared client: each thread gets its own connection
            assert list(pool.map(work, range(32))) == [2] * 32


def test_redbatch_predict_prints_labels_and_scores(service: Service, tmp_path: Path) -> None:
    images = []
    for seed in range(3):
        images.append(tmp_path / f"img{seed}.jpg")
        images[-1].write_bytes(make_image(seed))
    cmd = [sys.executable, "-m", "common.cli", "predict", *map(str, images), "--url", service.url, "--topk", "3"]
    proc = subprocess.run([*cmd, "--timing"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 * 5  # a heading, where the time went and 3 classes per image
    for i, path in enumerate(images):
        heading, timed, *classes = lines[5 * i : 5 * i + 5]
        assert heading.startswith(f"{path}: {ARCH}, batch ")  # --model defaults to the only one served
        total, parts = timed.removeprefix("  time ").split(" ms: ")
        split = dict(part.split() for part in parts.split(", "))
        assert list(split) == ["api", "queue", "prep", "batch", "infer", "http"]
        assert abs(sum(map(float, split.values())) - float(total)) < 0.05  # the parts add up to the client's time
        scores = [float(ln.split()[-1]) for ln in classes]
        assert scores == sorted(scores, reverse=True)
        assert len({ln.rindex(" ") for ln in classes}) == 1  # the score column is aligned

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    cmd = [sys.executable, "-m", "common.cli", "predict", str(images[0]), str(bad), str(tmp_path / "missing.jpg"),
           "--url", service.url, "--model", ARCH, "--topk", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1
    assert f"{bad}: error invalid_image: " in proc.stdout
    assert f"{tmp_path / 'missing.jpg'}: error cannot read: " in proc.stdout
    assert proc.stdout.startswith(f"{images[0]}: {ARCH}")  # the good one is still answered
    assert "2 of 3 images failed" in proc.stderr


# ---- retries, against a stub ------------------------------------------------------------------


class Stub:
    """An HTTP/1.1 server that answers requests with a script of (status, headers, delay_s)."""

    def __init__(self, script: list[tuple[int, dict[str, str], float]], close_after_each: bool = False) -> None:
        self.script = list(script)
        self.requests: list[str] = []
        self.connections = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                stub.connections += 1

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.answer()

            def do_GET(self) -> None:
                self.answer()

            def answer(self) -> None:
                stub.requests.append(self.path)
                status, headers, delay_s = stub.script.pop(0) if stub.script else (200, {}, 0.0)
                time.sleep(delay_s)
                if status == 200:
                    doc: dict[str, object] = {"id": "x" * 32, "model": "m", "batch_size": 1, "queue_ms": 0,
                                              "infer_ms": 1.0, "predictions": [{"index": 1, "label": "one",
                                                                                "score": 0.9}]}  # fmt: skip
                else:
                    doc = {"error": {"code": "queue_full" if status == 503 else "deadline_exceeded", "message": "x"}}
                data = json.dumps(doc).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = close_after_each  # closes without saying so, as an idle timeout does

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Callable[..., Stub]]:
    made: list[Stub] = []

    def make(script: list[tuple[int, dict[str, str], float]], close_after_each: bool = False) -> Stub:
        made.append(Stub(script, close_after_each))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_503_with_retry_after_is_retried_until_it_succeeds(stub: Callable[..., Stub]) -> None:
    server = stub([(503, {"Retry-After": "1"}, 0.0), (503, {"Retry-After": "1"}, 0.0)])
    with Client(server.url, retries=3) as client:
        t0 = time.monotonic()
        p = client.predict(make_image(1), "m")
        elapsed_s = time.monotonic() - t0
    assert p.predictions[0].label == "one"
    assert len(server.requests) == 3  # two 503s, then the answer
    assert 2.0 <= elapsed_s < 4.0  # each retry waited the second the server asked for


def test_503_past_the_retry_budget_raises_queue_full(stub: Callable[..., Stub]) -> None:
    server = stub([(503, {"Retry-After": "0"}, 0.0)] * 5)
    with Client(server.url, retries=2) as client, pytest.raises(QueueFull):
        client.predict(make_image(1), "m")
    assert len(server.requests) == 3


def test_504_and_503_without_retry_after_are_not_retried(stub: Callable[..., Stub]) -> None:
    server = stub([(504, {}, 0.0), (503, {}, 0.0)])
    with Client(server.url, retries=3) as client:
        with pytest.raises(DeadlineExceeded):
            client.predict(make_image(1), "m")
        assert len(server.requests) == 1
        with pytest.raises(QueueFull):
            client.predict(make_image(1), "m")
        assert len(server.requests) == 2


def test_a_read_timeout_after_sending_is_not_retried(stub: Callable[..., Stub]) -> None:
    server = stub([(200, {}, 1.0)])
    with Client(server.url, timeout_s=0.3, retries=3) as client, pytest.raises(DeadlineExceeded, match="may have run"):
        client.predict(make_image(1), "m")
    time.sleep(0.8)
    assert len(server.requests) == 1


def test_connection_refused_is_retried_with_backoff_then_raises_unavailable() -> None:
    port = free_port()  # nothing listens there
    policy = RetryPolicy(retries=3, backoff_s=0.01, jitter=0.0)
    with Client(f"http://127.0.0.1:{port}", policy=policy) as client:
        waits: list[float] = []
        client.sleep = waits.append
        with pytest.raises(Unavailable, match="before the request was sent"):
            client.predict(make_image(1), "m")
    assert waits == [0.01, 0.02, 0.04]


def test_a_keep_alive_connection_closed_by_the_server_is_replaced_before_use(stub: Callable[..., Stub]) -> None:
    server = stub([], close_after_each=True)
    with Client(server.url, retries=0) as client:  # no retries: only the check before reuse can save it
        for _ in range(3):
            assert client.predict(make_image(1), "m").predictions
            time.sleep(0.05)  # the server's close reaches the client
    assert len(server.requests) == 3 and server.connections == 3


def test_the_cli_exits_non_zero_when_the_service_is_down() -> None:
    env = {**os.environ}
    cmd = [sys.executable, "-m", "common.cli", "predict", "x.jpg", "--url", f"http://127.0.0.1:{free_port()}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 1
    assert "unavailable" in proc.stderr
