"""The worker's Prometheus metrics, served on its own port (``--metrics-port``).

A worker is one process, so the default registry is the right one; ``--instances`` (several
worker processes under one supervisor) uses prometheus_client's multiprocess mode instead, and the
supervisor serves their sum (``serve_instances``). Counts are observed once per
forward pass (queue time once per item); the queue length and in-flight gauges are read from Redis
at scrape time, so they are true even while the model is busy. Every metric is labelled by model.
``redbatch_inference_count_total / redbatch_execution_count_total`` is the mean batch size, as
Triton's ``nv_inference_count / nv_inference_exec_count``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.config import Settings
from common.queues import PRIORITIES

logger = logging.getLogger(__name__)

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

QUEUE_SECONDS = Histogram(
    "redbatch_queue_duration_seconds",
    "Time from the API's enqueue to the start of the forward pass that served the request",
    ["model"],
    buckets=SECONDS,
)
COMPUTE_SECONDS = Histogram(
    "redbatch_compute_duration_seconds",
    "Time of one forward pass: preprocess on the device, forward, postprocess",
    ["model"],
    buckets=SECONDS,
)
BATCH_SIZE = Histogram("redbatch_batch_size", "Items in one forward pass", ["model"], buckets=SIZES)
INFERENCES = Counter("redbatch_inference_count", "Items answered by a successful forward pass", ["model"])
EXECUTIONS = Counter("redbatch_execution_count", "Successful forward passes (batches)", ["model"])
EXPIRED = Counter("redbatch_expired", "Requests skipped because their deadline passed before the model", ["model"])
ERRORS = Counter("redbatch_errors", "Requests answered with an error (bad frame or input, model failure)", ["model"])
# livesum: under ``--instances`` (one metrics port for all, below) the number of live instances taking requests
UP = Gauge(
    "redbatch_worker_up",
    "1 while the worker takes requests, 0 once it stops taking them",
    ["model"],
    multiprocess_mode="livesum",
)


class WorkerMetrics:
    """The metric children of one model, bound once so the hot path does no label lookups."""

    def __init__(self, model: str) -> None:
        self.queue_s = QUEUE_SECONDS.labels(model)
        self.compute_s = COMPUTE_SECONDS.labels(model)
        self.batch_size = BATCH_SIZE.labels(model)
        self.inferences = INFERENCES.labels(model)
        self.executions = EXECUTIONS.labels(model)
        self.expired = EXPIRED.labels(model)
        self.errors = ERRORS.labels(model)
        self.up = UP.labels(model)

    def batch(self, size: int, compute_s: float, queue_ms: Iterable[int]) -> None:
        """One successful forward pass of ``size`` items that took ``compute_s``."""
        self.executions.inc()
        self.inferences.inc(size)
        self.batch_size.observe(size)
        self.compute_s.observe(compute_s)
        for ms in queue_ms:
            self.queue_s.observe(max(ms, 0) / 1000.0)  # machines' clocks may differ a little

    def count(self, counts: Mapping[str, int]) -> None:
        """The ``expired`` and ``errors`` of a worker's per-batch stats counter."""
        if n := counts.get("expired", 0):
            self.expired.inc(n)
        if n := counts.get("errors", 0):
            self.errors.inc(n)


class RedisGauges:
    """``redbatch_queue_length{model,priority}`` and ``redbatch_inflight_requests{model}``, read with
    LLEN at scrape time. ``queues`` maps each priority to its list; ``inflight`` gives this worker's
    in-flight lists (one; under ``--instances``, every instance's), summed."""

    def __init__(
        self, r: redis.Redis, model: str, queues: Mapping[str, str], inflight: Callable[[redis.Redis], list[str]]
    ) -> None:
        self._r = r
        self._model = model
        self._queues = dict(queues)
        self._inflight = inflight

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        try:
            inflight = self._inflight(self._r)
            with self._r.pipeline(transaction=False) as pipe:
                for key in [*self._queues.values(), *inflight]:
                    pipe.llen(key)
                lengths: list[int] = pipe.execute()
        except redis.RedisError as exc:  # the scrape still shows the process's own metrics
            logger.warning("metrics: Redis error reading queue lengths (%s)", exc)
            return []
        return self._families(lengths)

    def _families(self, lengths: Sequence[int] = ()) -> list[Metric]:
        queue = GaugeMetricFamily(
            "redbatch_queue_length", "Requests waiting in the model's queue", labels=["model", "priority"]
        )
        inflight = GaugeMetricFamily(
            "redbatch_inflight_requests", "Requests this worker has taken but not yet answered", labels=["model"]
        )
        if lengths:
            for priority, n in zip(self._queues, lengths):
                queue.add_metric([self._model, priority], n)
            inflight.add_metric([self._model], sum(lengths[len(self._queues) :]))
        return [queue, inflight]


def serve(settings: Settings, worker_id: str) -> None:
    """Serve ``/metrics`` (the default registry plus the Redis gauges) on ``settings.metrics_port``,
    all interfaces. The gauges get a client of their own that fails fast and never retries, so a
    scrape during a Redis outage still answers, within Prometheus's scrape timeout."""
    inflight = [settings.keys.inflight(worker_id)]
    _serve(settings, REGISTRY, lambda _r: inflight)


def serve_instances(settings: Settings, multiproc_dir: str, instance_pids: Callable[[], set[int]]) -> None:
    """``/metrics`` of ``--instances`` on ``settings.metrics_port``, served by their supervisor: the
    instances write their values into ``multiproc_dir`` (prometheus_client's multiprocess mode) and a
    scrape adds them up, with the queue lengths and every live instance's in-flight list from Redis.
    The instances are the registered workers of this host whose pid is in ``instance_pids()``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
    keys, host = settings.keys, socket.gethostname()

    def inflight(r: redis.Redis) -> list[str]:
        pids = {f"{host}-{pid}-" for pid in instance_pids()}
        ids = (m.decode() for m in r.smembers(keys.workers()))  # type: ignore[union-attr]
        return [keys.inflight(i) for i in ids if i[: i.rfind("-") + 1] in pids]

    _serve(settings, registry, inflight)


def _serve(settings: Settings, registry: CollectorRegistry, inflight: Callable[[redis.Redis], list[str]]) -> None:
    r = redis.Redis.from_url(
        settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    model = settings.served_name
    queues = {p: settings.keys.queue(model, p) for p in PRIORITIES}
    registry.register(RedisGauges(r, model, queues, inflight))
    # No *_created series beside every counter and histogram: noise for this process's scrapes.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        start_http_server(settings.metrics_port, registry=registry)
    except OSError as exc:
        raise SystemExit(f"--metrics-port {settings.metrics_port}: {exc}") from None
    logger.info("metrics on http://0.0.0.0:%d/metrics", settings.metrics_port)
