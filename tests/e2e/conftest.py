"""End to end: ``redbatch api`` (gunicorn) and ``redbatch worker`` as real processes on a real Redis."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
import torchvision
from PIL import Image

from tests.conftest import RedisServer, free_port, make_image

ARCH = "mobilenet_v3_small"
ROOT = Path(__file__).resolve().parents[2]


def calibrated_weights(path: Path) -> None:
    """Random-init weights made useful for comparisons: BatchNorm statistics calibrated on a few
    images (random init alone gives near-zero activations, so every image would score the same)
    and the classifier scaled so that scores are peaked and differ between images."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(ARCH, weights=None)
    preset = torchvision.models.get_model_weights(ARCH).DEFAULT.transforms()
    x = torch.stack([preset(Image.open(io.BytesIO(make_image(1000 + s))).convert("RGB")) for s in range(32)])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
        model.classifier[3].weight.mul_(300)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / f"{ARCH}.pt"
    calibrated_weights(path)
    return path


class Service:
    def __init__(self, redis_url: str, weights: Path, logdir: Path, **worker_flags: str) -> None:
        self.prefix = f"e2e{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "REDBATCH_REDIS_URL": redis_url, "REDBATCH_PREFIX": self.prefix}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logdir = logdir
        flags = {"--max-batch-size": "16", "--window-ms": "5", "--torch-threads": "1", **worker_flags}
        self.worker_cmd = [sys.executable, "-m", "common.cli", "worker", "--model", ARCH, "--weights", str(weights),
                           "--device", "cpu", *[x for kv in flags.items() for x in kv]]  # fmt: skip
        self.api = self._spawn("api", ["api", "--bind", f"127.0.0.1:{self.port}", "--workers", "2", "--threads", "48"])
        self.worker = self._spawn("worker", self.worker_cmd[3:])

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}-{uuid.uuid4().hex[:4]}.log", "wb")  # noqa: SIM115
        return subprocess.Popen(
            [sys.executable, "-m", "common.cli", *args], env=self.env, stdout=log, stderr=log, cwd=ROOT
        )

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in (self.api, self.worker):
                assert p.poll() is None, f"a process exited early; logs in {self.logdir}"
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"service not ready; logs in {self.logdir}")

    def stop(self) -> None:
        for p in (self.worker, self.api):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.worker, self.api):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, weights_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    svc = Service(redis_server.url, weights_file, tmp_path_factory.mktemp("logs"))
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()
