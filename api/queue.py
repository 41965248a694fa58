"""The API's side of Redis: submit a request frame, await its reply, know which models are live."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from common.config import Settings
from common.errors import DeadlineExceeded, ModelNotFound, QueueFull, Unavailable
from common.protocol import Reply, Request, decode_reply, encode_request, now_ms
from common.queues import FULL, MIN_BLOCK_S, Enqueuer, admitted, block_timeout
from common.redisconn import connect
from common.registry import WorkerInfo, live_workers
from common.resp import Link


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
        # Above the longest BLPOP; with Redis down, answer 503 fast.
        self._r = connect(settings, settings.request_timeout_s, connect_timeout_s=1.0)
        self._enqueuer = Enqueuer(self._r, self._keys)
        # The predict path's own connections, last used first (``_enqueue_and_wait``).
        self._link = Link(self._r)
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

    def call_all(self, reqs: list[Request], priority: str = "normal") -> Iterator[Reply]:
        """Enqueue every request and yield their replies in order, each when it arrives.

        One round trip queues them all and blocks on the first reply: one write carries the enqueue
        scripts and the first BLPOP, and Redis answers the scripts at once and the BLPOP when the
        worker replies. Raises ``QueueFull``, ``Unavailable`` (Redis down, or refusing a write, e.g.
        at its maxmemory) or ``DeadlineExceeded``; frames already queued are still answered by a
        worker and their replies expire unread.
        """
        if not reqs:
            return
        bound, ttl_ms = self._settings.max_queue_length, int(self._settings.reply_ttl_s * 1000)
        first = reqs[0]
        left_s = (first.deadline_ms - now_ms()) / 1000.0
        if left_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        commands = [
            cmd
            for req in reqs
            for cmd in self._enqueuer.commands(
                req.model, encode_request(req), priority, bound, self._keys.reply(req.id), ttl_ms
            )
        ]
        commands.append(("BLPOP", self._keys.reply(first.id), block_timeout(left_s)))
        yield self._parse(self._enqueue_and_wait(commands, first.model), first.model)
        for req in reqs[1:]:
            yield self.wait(req)

    def wait(self, req: Request) -> Reply:
        """Block (BLPOP, no polling) until the reply to a queued ``req`` or its deadline (``DeadlineExceeded``)."""
        left_s = (req.deadline_ms - now_ms()) / 1000.0
        try:
            got = self._r.blpop([self._keys.reply(req.id)], timeout=max(left_s, MIN_BLOCK_S)) if left_s > 0 else None
        except redis.RedisError as exc:
            raise Unavailable(f"Redis is unreachable: {type(exc).__name__}") from None
        return self._parse(got, req.model)

    def _enqueue_and_wait(self, commands: list[tuple[object, ...]], model: str) -> Any:
        """Send the enqueue ``commands`` and a BLPOP in one write; the BLPOP's answer.

        A refused write (an error) or a full queue behind the first frame leaves the BLPOP blocked
        on this connection: it is closed instead of reused, and the error raised.

        The connection comes from this client's own stack of idle ones (``common/resp.py``), not
        redis-py's pool: the pool's hand-out polls every connection for stray data and records its
        observability counters, 9 % of an API process's CPU under load (docs/benchmarks.md); the
        commands go in one write, packed with the frame in one buffer. A connection goes back on
        the stack only after a whole exchange, so none holds unread data; one that Redis closed
        while it sat idle (a restart) fails before any answer is read, and the commands are sent
        once more on a new connection (had Redis queued them before it closed the connection, a
        worker answers twice and the second reply expires unread). An error raised while reading
        closes the connection (a BLPOP may still be pending on it).
        """

        def read(answer: Callable[[], Any]) -> Any:
            counts = []
            for cmd in commands[:-1]:
                try:
                    got = answer()
                    if cmd[0] == "EXEC":  # one per frame: its queue's length, or -1 when refused
                        counts.append(admitted(got))
                except redis.ResponseError as exc:  # e.g. OOM at maxmemory: that frame was not queued
                    raise Unavailable(f"Redis refused the request: {exc}") from None
            if -1 in counts[1:]:
                raise self._full(model)
            return answer()  # FULL at once when the first frame was refused

        try:
            return self._link.call(commands, read)
        except redis.RedisError as exc:
            raise Unavailable(f"Redis is unreachable: {type(exc).__name__}") from None

    def _parse(self, got: Any, model: str) -> Reply:
        if got is None:
            # The worker may still answer; its reply key carries a TTL and expires unread.
            raise DeadlineExceeded("no reply before the request's deadline")
        raw = cast(bytes, got[1])
        if raw == FULL:
            raise self._full(model)
        return decode_reply(raw)

    def _full(self, model: str) -> QueueFull:
        return QueueFull(f"the queue of {model!r} is full ({self._settings.max_queue_length} waiting)")


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
