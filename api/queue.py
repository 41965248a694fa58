"""The API's side of Redis: submit a request frame, await its reply, know which models are live."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from common.config import Settings
from common.errors import DeadlineExceeded, ModelNotFound, QueueFull, Unavailable
from common.protocol import Reply, Request, decode_reply, encode_request, now_ms
from common.queues import Enqueuer
from common.registry import WorkerInfo, live_workers

MIN_BLOCK_S = 0.01  # BLPOP's timeout 0 means forever: never send it


@dataclass
class ModelInfo:
    name: str
    spec: dict[str, Any]
    max_batch_size: int
    workers: list[WorkerInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input": {k: self.spec.get(k) for k in ("shape", "dtype", "resize_size", "crop_size", "interpolation")},
            "accepts": self.spec.get("accepts", ["uint8"]),
            "max_batch_size": self.max_batch_size,
            "live_workers": len(self.workers),
            "devices": sorted({w.device for w in self.workers}),
        }


class QueueClient:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys = settings.keys
        self._r = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.request_timeout_s + 5.0,  # above the longest BLPOP
            socket_connect_timeout=1.0,  # Redis down: answer 503 fast
            socket_keepalive=True,
            health_check_interval=30,
            decode_responses=False,
        )
        self._enqueuer = Enqueuer(self._r, self._keys)
        self._models: dict[str, ModelInfo] = {}
        self._models_at = float("-inf")
        self._lock = threading.Lock()

    def ping(self) -> bool:
        try:
            return bool(self._r.ping())
        except redis.RedisError:
            return False

    def models(self, fresh: bool = False) -> dict[str, ModelInfo]:
        """Live models, cached for ``model_cache_s``; raises ``Unavailable`` when Redis is down."""
        with self._lock:
            stale = time.monotonic() - self._models_at > self._settings.model_cache_s
            if fresh or stale or not self._models:  # an empty answer is not worth caching
                try:
                    workers = live_workers(self._r, self._keys)
                except redis.RedisError as exc:
                    raise Unavailable(f"Redis is unreachable: {type(exc).__name__}") from None
                self._models = _group(workers)
                self._models_at = time.monotonic()
            return self._models

    def model(self, name: str) -> ModelInfo:
        """The live model ``name``; a cache miss is re-read from Redis before it becomes a 404."""
        info = self.models().get(name) or self.models(fresh=True).get(name)
        if info is None:
            raise ModelNotFound(f"no live worker serves model {name!r}")
        return info

    def call(self, req: Request, priority: str = "normal") -> Reply:
        """Enqueue ``req`` at ``priority`` and block (BLPOP, no polling) until its reply or its deadline."""
        self.submit(req, priority)
        return self.wait(req)

    def submit(self, req: Request, priority: str = "normal") -> None:
        """Enqueue ``req`` at ``priority``; raises ``QueueFull`` at the bound, ``Unavailable`` when Redis is down."""
        bound = self._settings.max_queue_length
        try:
            n = self._enqueuer.push(req.model, encode_request(req), priority, bound)
        except redis.RedisError as exc:
            raise Unavailable(f"Redis is unreachable: {type(exc).__name__}") from None
        if n == -1:
            raise QueueFull(f"the queue of {req.model!r} is full ({bound} waiting)")

    def wait(self, req: Request) -> Reply:
        """Block (BLPOP, no polling) until the reply to a submitted ``req`` or its deadline (``DeadlineExceeded``)."""
        left_s = (req.deadline_ms - now_ms()) / 1000.0
        try:
            got = self._r.blpop([self._keys.reply(req.id)], timeout=max(left_s, MIN_BLOCK_S)) if left_s > 0 else None
        except redis.RedisError as exc:
            raise Unavailable(f"Redis is unreachable: {type(exc).__name__}") from None
        if got is None:
            # The worker may still answer; its reply key carries a TTL and expires unread.
            raise DeadlineExceeded("no reply before the request's deadline")
        return decode_reply(cast(bytes, got[1]))


def _group(workers: list[WorkerInfo]) -> dict[str, ModelInfo]:
    by_model: dict[str, list[WorkerInfo]] = defaultdict(list)
    for w in workers:
        by_model[w.model].append(w)
    out = {}
    for name, ws in sorted(by_model.items()):
        # Send JPEG bytes only if every worker of the model decodes them itself.
        accepts = [a for a in ws[0].spec.get("accepts", ["uint8"]) if all(a in w.spec.get("accepts", []) for w in ws)]
        out[name] = ModelInfo(name, {**ws[0].spec, "accepts": accepts}, max(w.max_batch_size for w in ws), ws)
    return out
