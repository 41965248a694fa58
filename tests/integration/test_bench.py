"""``redbatch bench`` against a tiny local HTTP server whose every answer is known, and the
in-process measurement on a real (small) model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import torch

from api.app import create_app
from common.bench import Body, make_images, run_level, target_for
from common.cli import main
from common.config import Settings
from worker.bench_inprocess import InProcessConfig, cores_at_once, format_report, measure

ROOT = Path(__file__).resolve().parents[2]
Answer = tuple[int, "int | None"]


class FakeService:
    """The predict route: every 5th request (in arrival order) gets 503, the others 200 with a
    batch_size cycling 1, 2, 3. Each keep-alive connection keeps its own list of answers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.connections: list[list[Answer]] = []
        self.seen: set[tuple[str, str]] = set()

    def new_connection(self) -> list[Answer]:
        log: list[Answer] = []
        with self.lock:
            self.connections.append(log)
        return log

    def answer(self, path: str, content_type: str) -> Answer:
        with self.lock:
            self.count += 1
            self.seen.add((path, content_type))
            n = self.count
        return (503, None) if n % 5 == 0 else (200, n % 3 + 1)

    def reset(self) -> None:
        with self.lock:
            self.count, self.connections, self.seen = 0, [], set()


def handler_for(service: FakeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn does
        disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stalls

        def setup(self) -> None:
            super().setup()
            self.answers = service.new_connection()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status, batch = service.answer(self.path, self.headers["Content-Type"])
            time.sleep(0.002)  # a service takes some time; keeps the request counts moderate
            self.answers.append((status, batch))  # before the reply, so the client never sees it first
            doc = {"id": "x", "model": "m", "predictions": [], "batch_size": batch, "queue_ms": 1, "infer_ms": 1.0}
            if status != 200:
                doc = {"error": {"code": "queue_full", "message": "the queue is full"}}
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[FakeService, str]]:
    fake = FakeService()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def bodies() -> list[Body]:
    return [Body(b, "image/jpeg") for b in make_images(3, (64, 48))]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_counts_errors_and_mean_batch_match_what_the_server_did(
    service: tuple[FakeService, str], bodies: list[Body], concurrency: int
) -> None:
    fake, url = service
    fake.reset()
    r = run_level(target_for(url, "m"), bodies, concurrency, warmup_s=0.0, duration_s=0.5)

    # one keep-alive connection per client, kept across 503s
    assert len(fake.connections) == concurrency
    assert fake.seen == {("/v1/models/m/predict", "image/jpeg")}
    # without warm-up, each client's last request (the one that ended after the window) is the only one not counted
    counted = [a for conn in fake.connections for a in conn[:-1]]
    ok_batches = [b for s, b in counted if s == 200 and b is not None]
    assert r.uncounted == concurrency
    assert r.requests == len(counted) > 20 * concurrency
    assert r.errors == sum(1 for s, _ in counted if s != 200) > 0
    assert r.statuses[503] == r.errors
    assert r.ok == len(ok_batches)
    assert r.mean_batch_size == pytest.approx(sum(ok_batches) / len(ok_batches))
    assert r.ok_per_s == pytest.approx(len(ok_batches) / 0.5)
    assert r.p50_ms is not None and r.p99_ms is not None and 2.0 <= r.p50_ms <= r.p99_ms


def test_warm_up_requests_are_sent_but_not_counted(service: tuple[FakeService, str], bodies: list[Body]) -> None:
    fake, url = service
    fake.reset()
    r = run_level(target_for(url, "m"), bodies, 2, warmup_s=0.3, duration_s=0.3)
    assert r.requests + r.uncounted == fake.count
    assert r.uncounted > 2 + 10  # the tail (one per client) and the warm-up


def test_the_command_prints_the_table_and_writes_json_and_plots(
    service: tuple[FakeService, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = service
    out, prefix = tmp_path / "out.json", tmp_path / "bench"
    args = ["bench", "--url", url, "--model", "m", "--concurrency", "1,2", "--duration-s", "0.2", "--warmup-s", "0.1"]
    assert main([*args, "--size", "64x48", "--json", str(out), "--plot", str(prefix)]) == 0

    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.lstrip().startswith("concurrency"))
    rows = text.splitlines()[text.splitlines().index(header) + 2 :][:2]
    assert [row.split()[0] for row in rows] == ["1", "2"]
    assert all(len(row) == len(header) for row in rows)
    assert "errors at concurrency 1: 503 x" in text

    doc = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 2]
    assert all(lv["requests"] > 0 and lv["errors"] > 0 and lv["mean_batch_size"] > 1 for lv in doc["levels"])
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped" in text
    else:
        assert (tmp_path / "bench-load.png").stat().st_size > 0
        assert (tmp_path / "bench-batches.png").stat().st_size > 0


def test_served_over_limit_from_the_in_process_report(
    service: tuple[FakeService, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The two commands compose: the limit that ``--in-process --json`` wrote is what every level's
    req/s is divided by, in the table and in the JSON."""
    _, url = service
    report, out = tmp_path / "limit.json", tmp_path / "out.json"
    local = ["--device", "cpu", "--batch-sizes", "1", "--duration-s", "0.05", "--warmup-s", "0", "--size", "64x48"]
    assert main(["bench", "--in-process", "--model", "mobilenet_v3_small", *local, "--json", str(report)]) == 0
    limit = json.loads(report.read_text())["machine_limit_ips"]
    capsys.readouterr()

    args = ["bench", "--url", url, "--model", "m", "--concurrency", "1,2", "--duration-s", "0.2", "--warmup-s", "0"]
    plots = ["--plot", str(tmp_path / "p")]  # with matplotlib: the limit drawn as a line on the throughput plot
    assert main([*args, "--size", "64x48", "--limit", str(report), "--json", str(out), *plots]) == 0

    text = capsys.readouterr().out
    assert f"limit: {limit:.1f} img/s (limit.json: mobilenet_v3_small, cpu, float32)" in text
    assert "note: the limit was measured for mobilenet_v3_small, and the served model is m" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("concurrency"))
    assert lines[header].split()[-1] == "served/limit"
    doc = json.loads(out.read_text())
    assert doc["limit_ips"] == limit
    for row, level in zip(lines[header + 2 : header + 4], doc["levels"]):
        assert level["served_over_limit"] == pytest.approx(level["ok_per_s"] / limit)
        assert float(row.split()[-1]) == pytest.approx(level["ok_per_s"] / limit, abs=0.006)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "p-load.png").stat().st_size > 0


def test_a_bad_limit_stops_the_command_before_any_load(
    service: tuple[FakeService, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, url = service
    fake.reset()
    assert main(["bench", "--url", url, "--model", "m", "--limit", str(tmp_path / "missing.json")]) == 2
    assert "--limit" in capsys.readouterr().err and fake.count == 0


def test_in_process_measurement_of_a_small_model_on_cpu() -> None:
    threads_before = torch.get_num_threads()
    cfg = InProcessConfig(model="mobilenet_v3_small", device="cpu", batch_sizes=(1, 2), duration_s=0.05, warmup_s=0.0)
    r = measure(cfg)

    assert torch.get_num_threads() == threads_before
    assert (r.model, r.device, r.weights) == ("mobilenet_v3_small", "cpu", "random")
    assert r.sweeps[0].threads == threads_before and r.sweeps[-1].threads == 1
    assert r.prep_api_ms > 0 and r.prep_worker_ms > 0  # both preprocessing paths, each timed
    assert r.prep_ms == min(r.prep_api_ms, r.prep_worker_ms)  # the faster one counts
    assert r.options == "BatchNorm folded"
    for sweep in r.sweeps:
        assert [row.batch_size for row in sweep.rows] == [1, 2]
        for row in sweep.rows:
            assert row.iterations >= 1 and row.model_ms > 0
            assert 0 < row.total_ips < row.model_ips
            assert row.model_ips == pytest.approx(row.batch_size * 1000 / row.model_ms)
    one_thread_best = max(row.total_ips for row in r.sweeps[-1].rows)
    assert r.machine_limit_ips == pytest.approx(r.cores * one_thread_best)
    assert "machine limit (one thread per core)" in format_report(r)
    if r.cores > 1:  # every core ran the limit's loop at once, in a process of its own
        assert r.cores_at_once_ips is not None and r.cores_at_once_ips > 0
        assert "cores at once" in format_report(r)


def test_the_cores_at_once_run_the_api_side_preprocessing_too() -> None:
    """Where Pillow in the API is the faster path, each process prepares images that way."""
    cfg = InProcessConfig(model="mobilenet_v3_small", device="cpu", duration_s=0.05, warmup_s=0.0)
    assert cores_at_once(cfg, 2, 2, "api") > 0


def test_a_timing_process_that_fails_stops_the_measurement_with_its_error() -> None:
    cfg = InProcessConfig(model="no_such_model", device="cpu", duration_s=0.05, warmup_s=0.0)
    with pytest.raises(RuntimeError, match="no_such_model"):
        cores_at_once(cfg, 2, 1, "worker")


def test_the_null_worker_answers_through_the_api_and_leaves_nothing_in_flight(settings: Settings) -> None:
    """bench/api_check.sh's stand-in for a model: a real worker's Redis traffic, no forward pass."""
    env = {
        **os.environ,
        "REDBATCH_REDIS_URL": settings.redis_url,
        "REDBATCH_PREFIX": settings.prefix,
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "null_worker.py"), "nullnet"], env=env)
    try:
        client = create_app(settings).test_client()
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "the null worker did not register"
            time.sleep(0.05)
        for seed in range(3):
            jpeg = make_images(1, (64, 48), seed)[0]
            resp = client.post("/v1/models/nullnet/predict", data=jpeg, content_type="image/jpeg")
            assert resp.status_code == 200, resp.get_json()
            assert [p["index"] for p in resp.get_json()["predictions"]] == [1, 2, 3, 4, 5]
        r = redis.Redis.from_url(settings.redis_url)
        assert not any(r.llen(k) for k in r.scan_iter(settings.keys.inflight("*")))
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_the_clients_connection_reads_lengths_chunks_and_reconnects_after_close() -> None:
    """The bench's own HTTP/1.1 client against a raw server: a Content-Length answer, a chunked
    one, a 503 that closes the connection (the next request opens a new one), each request whole."""
    import socket

    from common.bench import KeepAlive, post

    answers = [
        b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"batch_size": 3}',
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"bat\r\nc;x=1\r\nch_size": 4}\r\n0\r\n\r\n',
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        b'HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\n{"batch_size": 5}',
    ]
    requests: list[bytes] = []
    connections = 0
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        nonlocal connections
        while answers:
            conn, _ = listener.accept()
            connections += 1
            with conn, conn.makefile("rb") as f:
                while answers:
                    head = b"".join(iter(lambda: f.readline(), b"\r\n"))
                    if not head:
                        break
                    length = int(
                        next(
                            v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k == b"Content-Length"
                        )
                    )
                    requests.append(head + b"\r\n" + f.read(length))
                    answer = answers.pop(0)
                    conn.sendall(answer)
                    if b"Connection: close" in answer:
                        break

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = KeepAlive(target_for(f"http://127.0.0.1:{port}", "m", api_key="k1"), timeout_s=5.0)
    body = Body(b"\xff\xd8jpeg-bytes", "image/jpeg")
    got = [post(client, body) for _ in range(4)]
    client.close()
    server.join(timeout=5)
    assert got == [(200, 3), (200, 4), (503, None), (200, 5)]
    assert connections == 2  # reopened once, after the server's Connection: close
    for req in requests:
        assert req.startswith(b"POST /v1/models/m/predict HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{port}\r\n".encode() in req and b"Authorization: Bearer k1\r\n" in req
        assert b"Content-Type: image/jpeg\r\nContent-Length: 12\r\n" in req and req.endswith(b"\r\n\r\n" + body.data)
