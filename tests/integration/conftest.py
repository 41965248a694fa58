"""A worker running in a thread on the real Redis, with a tiny handler (no torchvision model)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import redis
import torch

from common.config import Settings
from common.protocol import TensorData
from common.redisconn import connect
from worker.handler import InputSpec
from worker.runner import BLOCK_S, Worker
from worker.threads import ThreadPlan

POISON = 13  # an input whose first pixel is this value makes the tiny model raise


class TinyHandler:
    """10 classes; class scores are a fixed function of the mean pixel, so answers are checkable."""

    spec = InputSpec(resize_size=8, crop_size=8, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.threads: list[int] = []  # torch's thread count during each forward pass

    def setup(self, device: torch.device) -> None:
        self.device = device

    def preprocess(self, inputs: Sequence[TensorData]) -> torch.Tensor:
        arr = np.stack([np.frombuffer(t.data, np.uint8).reshape(t.shape) for t in inputs])
        return torch.from_numpy(arr.copy()).float()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if bool((batch[:, 0, 0, 0] == POISON).any()):
            raise RuntimeError("poisoned input")
        self.batch_sizes.append(batch.shape[0])
        self.threads.append(torch.get_num_threads())
        m = batch.mean(dim=(1, 2, 3), keepdim=False)
        return torch.stack([-((m - 25.5 * c) ** 2) / 50 for c in range(10)], dim=1)

    def postprocess(self, output: torch.Tensor, params: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        probs = output.softmax(1)
        out = []
        for row, p in zip(probs, params):
            k = int(p.get("topk", 5))
            s, i = torch.topk(row, min(k, 10))
            out.append({"indices": i.tolist(), "scores": s.tolist(), "labels": [f"c{j}" for j in i.tolist()]})
        return out

    def check_input(self, t: TensorData) -> str | None:
        return None if t.shape == self.spec.shape and t.dtype == "uint8" else f"bad input {t.shape}"


def expected_top1(pixel_value: int) -> int:
    return min(range(10), key=lambda c: abs(pixel_value - 25.5 * c))


def server_timing(header: str | None) -> dict[str, float]:
    """An answer's ``Server-Timing`` parts, read strictly (exactly the service's own format)."""
    assert header, "an answer without Server-Timing"
    return {name: float(dur.removeprefix("dur=")) for name, _, dur in (e.partition(";") for e in header.split(", "))}


class OomHandler(TinyHandler):
    """Runs out of device memory on any batch larger than ``fits``."""

    fits = 3

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().forward(batch)


class RunningWorker:
    def __init__(
        self,
        settings: Settings,
        handler: TinyHandler | None = None,
        thread_plan: ThreadPlan | None = None,
        lanes: int = 1,
    ) -> None:
        self.handler = handler or TinyHandler()
        self.handler.setup(torch.device("cpu"))
        r = connect(settings, BLOCK_S)
        self.worker = Worker(settings, self.handler, torch.device("cpu"), r, thread_plan, lanes)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        wait_registered(redis.Redis.from_url(settings.redis_url), settings)

    def stop(self) -> None:
        self.worker.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def start_worker(settings: Settings) -> Iterator[Callable[..., RunningWorker]]:
    started: list[RunningWorker] = []

    def start(
        handler: TinyHandler | None = None, thread_plan: ThreadPlan | None = None, lanes: int = 1, **overrides: Any
    ) -> RunningWorker:
        s = settings.replace(**{"model": "tiny", "request_timeout_s": 5.0, **overrides})
        w = RunningWorker(s, handler, thread_plan, lanes)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.thread.is_alive():
            w.stop()


def wait_registered(r: redis.Redis, settings: Settings) -> None:
    import time

    deadline = time.monotonic() + 5
    while not r.smembers(settings.keys.workers()):
        assert time.monotonic() < deadline, "worker did not register"
        time.sleep(0.01)
