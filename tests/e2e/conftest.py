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
    """``redbatch api`` and one or more ``redbatch worker`` processes under a key prefix of their own."""

    def __init__(self, redis_url: str, weights: Path, logdir: Path, env: dict[str, str] | None = None,
                 workers: int = 1, **worker_flags: str) -> None:  # fmt: skip
        self.prefix = f"e2e{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "REDBATCH_REDIS_URL": redis_url, "REDBATCH_PREFIX": self.prefix, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logdir = logdir
        flags = {"--max-batch-size": "16", "--window-ms": "5", "--torch-threads": "1", **worker_flags}
        self.worker_cmd = [sys.executable, "-m", "common.cli", "worker", "--model", ARCH, "--weights", str(weights),
                           "--device", "cpu", *[x for kv in flags.items() for x in kv]]  # fmt: skip
        self.api = self._spawn("api", ["api", "--bind", f"127.0.0.1:{self.port}", "--workers", "2", "--threads", "48"])
        self.workers = [self.start_worker() for _ in range(workers)]

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}-{uuid.uuid4().hex[:4]}.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "common.cli", *args]
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log, cwd=ROOT)

    def start_worker(self) -> subprocess.Popen[bytes]:
        proc = self._spawn("worker", self.worker_cmd[3:])
        return proc

    @property
    def worker(self) -> subprocess.Popen[bytes]:
        return self.workers[0]

    def predict_url(self) -> str:
        return f"{self.url}/v1/models/{ARCH}/predict"

    def wait_ready(self, timeout_s: float = 120, workers: int | None = None) -> None:
        """Until /readyz answers 200 and ``workers`` (default: all started) are registered."""
        want = len([p for p in self.workers if p.poll() is None]) if workers is None else workers
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.api.poll() is None, f"the API exited early; logs in {self.logdir}"
            try:
                ready = requests.get(self.url + "/readyz", timeout=1).status_code == 200
                if ready and self.live_workers() >= want:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or its processes still booting: the request waits in the backlog
            time.sleep(0.2)
        raise AssertionError(f"service not ready; logs in {self.logdir}")

    def live_workers(self) -> int:
        models = requests.get(self.url + "/v1/models", timeout=2).json()["models"]
        return sum(m["live_workers"] for m in models)

    def stop(self) -> None:
        procs = [*self.workers, self.api]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
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
