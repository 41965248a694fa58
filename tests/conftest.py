"""Shared fixtures: a real redis-server per session, a unique key prefix per test, test images."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from PIL import Image

from common.config import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server on a free port; ``stop``/``start`` keep the port (outage tests)."""

    def __init__(self, extra_args: tuple[str, ...] = (), tls: bool = False, url: str = "") -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not on PATH (.ci/run installs it)")
        self.exe = exe
        self.port = free_port()
        self.url = (url or "redis://127.0.0.1:{port}/0").format(port=self.port)
        self.ports = ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, *self.ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *self.extra_args],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    """Settings on the session's redis-server under a key prefix of this test's own."""
    return Settings(redis_url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def make_image(seed: int, size: tuple[int, int] = (320, 240), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A distinct, structured test image: smooth colour fields plus shapes and noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = [*rng.uniform(0.005, 0.05, 2).tolist(), rng.uniform(0, 6.3)]
        img[..., c] = 127 + 120 * np.sin(xx * fx + yy * fy + ph)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    pil.save(buf, fmt)
    return buf.getvalue()
