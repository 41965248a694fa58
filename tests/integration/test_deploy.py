"""The compose stack's moving parts run for real where Docker is not needed: docker/nginx.conf in a
local nginx in front of two stand-in API replicas, and Redis with the compose file's memory policy.
The nginx tests skip when nginx is not installed (apt-get install nginx-light)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests
import yaml

from api.app import create_app
from common.config import Settings
from tests.conftest import RedisServer, free_port, make_image
from tests.integration.conftest import TinyHandler
from tests.unit.test_compose import COMPOSE
from tests.unit.test_deploy import NGINX_CONF, api_port, interpolate
from worker.broker import WorkerBroker

MiB = 1024 * 1024


class _Replica(BaseHTTPRequestHandler):
    """Stands in for one API replica: answers 200 with what it received, as JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn's

    def _answer(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        received = len(self.rfile.read(size)) if size else 0
        body = json.dumps(
            {
                "replica": self.server.server_port,
                "peer_port": self.client_address[1],
                "version": self.request_version,
                "bytes": received,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def replicas() -> Iterator[list[int]]:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Replica) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [s.server_port for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def start_nginx() -> Iterator[Callable[[list[int]], str]]:
    """Runs docker/nginx.conf with its upstream pointed at the given local ports; returns its URL."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    procs: list[subprocess.Popen[bytes]] = []
    # World-traversable: under root, nginx's workers run as `nobody` and write request bodies here.
    work = tempfile.mkdtemp(prefix="redbatch-nginx-")
    os.chmod(work, 0o755)

    def start(ports: list[int]) -> str:
        listen = free_port()
        text = NGINX_CONF.read_text().replace(" /tmp/", f" {work}/")
        servers = " ".join(f"server 127.0.0.1:{p};" for p in ports)
        text, n = re.subn(rf"server api:{api_port()}[^;]*;", servers, text)
        assert n == 1
        text, n = re.subn(r"listen 8080;", f"listen 127.0.0.1:{listen};", text)
        assert n == 1
        conf = os.path.join(work, f"nginx-{listen}.conf")
        with open(conf, "w") as f:
            f.write(text)
        log = open(os.path.join(work, f"nginx-{listen}.log"), "wb")  # noqa: SIM115 (the child keeps its own copy)
        cmd = ["nginx", "-p", work, "-e", "stderr", "-c", conf, "-g", "daemon off;"]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=0.2).close()
                return f"http://127.0.0.1:{listen}"
            except OSError:
                if procs[-1].poll() is not None:
                    with open(log.name) as f:
                        pytest.fail(f"nginx did not start:\n{f.read()}")
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.02)

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)
    shutil.rmtree(work, ignore_errors=True)


def test_nginx_spreads_requests_over_every_replica_on_kept_alive_connections(
    start_nginx: Callable[[list[int]], str], replicas: list[int]
) -> None:
    url = start_nginx(replicas)
    with requests.Session() as s:
        seen = [s.get(f"{url}/healthz", timeout=5).json() for _ in range(20)]
    assert {r["replica"] for r in seen} == set(replicas)
    assert all(r["version"] == "HTTP/1.1" for r in seen)
    connections = {(r["replica"], r["peer_port"]) for r in seen}
    assert len(connections) < len(seen), "every request opened a new connection to its replica"


def test_nginx_passes_the_clients_headers_and_its_own(
    start_nginx: Callable[[list[int]], str], replicas: list[int]
) -> None:
    url = start_nginx(replicas)
    sent = {"Authorization": "Bearer k", "X-Request-Timeout-Ms": "500", "X-Priority": "high"}
    got = requests.post(f"{url}/v1/models/m/predict", data=b"x", headers=sent, timeout=5).json()["headers"]
    assert {k.lower(): v for k, v in sent.items()}.items() <= got.items()
    assert got["x-forwarded-for"] == "127.0.0.1" and got["x-real-ip"] == "127.0.0.1"
    assert got.get("connection", "keep-alive").lower() != "close"


def test_nginx_passes_a_body_at_the_apis_limit_and_refuses_a_larger_one_as_json(
    start_nginx: Callable[[list[int]], str], replicas: list[int]
) -> None:
    url = start_nginx(replicas)
    limit = Settings().max_body_bytes
    got = requests.post(f"{url}/v1/models/m/predict", data=b"\0" * limit, timeout=30).json()
    assert got["bytes"] == limit

    # Headers only: nginx answers from the Content-Length, before any of the body is sent.
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=5)
    conn.putrequest("POST", "/v1/models/m/predict")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    assert resp.getheader("Content-Type") == "application/json"
    assert json.loads(resp.read())["error"]["code"] == "payload_too_large"
    conn.close()


def test_nginx_without_a_live_replica_is_a_json_503_with_retry_after(
    start_nginx: Callable[[list[int]], str],
) -> None:
    url = start_nginx([free_port(), free_port()])  # nothing listens there
    resp = requests.post(f"{url}/v1/models/m/predict", data=b"x", timeout=10)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "1"
    assert resp.json()["error"]["code"] == "unavailable"


def test_a_full_redis_under_the_compose_policy_is_a_503_and_loses_nothing() -> None:
    command = [interpolate(a) for a in yaml.safe_load(COMPOSE.read_text())["services"]["redis"]["command"]]
    assert command[0] == "redis-server"
    server = RedisServer(extra_args=(*command[1:], "--maxmemory", "4mb"))  # the compose flags, a small cap
    server.start()
    try:
        r = redis.Redis.from_url(server.url)
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        s = Settings(redis_url=server.url, prefix="deploy", model="tiny", request_timeout_s=0.2)
        worker = WorkerBroker(r, s, "ghost")  # a live-looking worker that never answers
        worker.register({"model": "tiny", "max_batch_size": 4, "spec": json.dumps(TinyHandler.spec.to_dict())})
        client = create_app(s).test_client()
        jpeg = {"Content-Type": "image/jpeg"}
        assert client.post("/v1/models/tiny/predict", data=make_image(1), headers=jpeg).status_code == 504
        assert r.llen(s.keys.queue("tiny")) == 1

        for size in (256 * 1024, 16 * 1024, 1024, 64):  # until not even a small write fits
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                for i in range(100_000):
                    r.set(f"filler:{size}:{i}", b"\0" * size)

        resp = client.post("/v1/models/tiny/predict", data=make_image(2), headers=jpeg)
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "1"
        assert resp.get_json()["error"]["code"] == "unavailable"
        # Nothing was evicted to make room: the waiting frame and the worker's registration remain.
        assert r.llen(s.keys.queue("tiny")) == 1
        assert r.exists(s.keys.worker("ghost"))
    finally:
        server.stop()
