"""Redis AUTH and TLS through the DSN (``rediss://user:pass@host:port/db``): the API and a worker work
against a password-protected server and over TLS, and a wrong password is a 503 that does not echo it."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from api.app import create_app
from common.config import Settings
from tests.conftest import RedisServer
from tests.integration.conftest import RunningWorker

SECRET = "s3cret-pass-word"


@pytest.fixture
def auth_redis() -> Iterator[RedisServer]:
    server = RedisServer(("--requirepass", SECRET), url=f"redis://default:{SECRET}@127.0.0.1:{{port}}/0")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    args = ("--requirepass", SECRET, "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")  # fmt: skip
    server = RedisServer(args, tls=True, url=f"rediss://default:{SECRET}@127.0.0.1:{{port}}/0?ssl_ca_certs={cert}")
    server.start()
    yield server
    server.stop()


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value,) * 3).save(buf, "PNG")
    return buf.getvalue()


def test_api_and_worker_authenticate_through_the_url(auth_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    s = Settings(redis_url=auth_redis.url, model="tiny", prefix="auth")
    worker = RunningWorker(s)
    try:
        client = create_app(s).test_client()
        resp = client.post("/v1/models/tiny/predict", data=_png(128), headers={"Content-Type": "image/png"})
        assert resp.status_code == 200
        wrong_url = auth_redis.url.replace(SECRET, "wrong")
        wrong = create_app(s.replace(redis_url=wrong_url)).test_client()
        resp = wrong.post("/v1/models/tiny/predict", data=_png(128), headers={"Content-Type": "image/png"})
        assert resp.status_code == 503
        assert SECRET not in resp.get_data(as_text=True) and "wrong" not in resp.get_data(as_text=True)
        assert SECRET not in caplog.text
    finally:
        worker.stop()


def test_api_and_worker_speak_tls_with_rediss_urls(tls_redis: RedisServer) -> None:
    assert tls_redis.url.startswith("rediss://")
    s = Settings(redis_url=tls_redis.url, model="tiny")
    worker = RunningWorker(s)
    try:
        resp = (
            create_app(s)
            .test_client()
            .post("/v1/models/tiny/predict", data=_png(30), headers={"Content-Type": "image/png"})
        )
        assert resp.status_code == 200 and resp.get_json()["predictions"][0]["index"] == 1
    finally:
        worker.stop()
