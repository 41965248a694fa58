"""The one class through which the worker talks to Redis.

Every frame a worker takes is moved atomically from the model's queue into the worker's own
in-flight list, and leaves it only in the same pipeline that sends its reply: a worker that dies
leaves its unanswered frames in Redis, where a peer or its successor puts them back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import redis

from common.config import Settings
from common.errors import DeadlineExceeded, FrameError
from common.protocol import Reply, decode_request, encode_reply, now_ms
from common.queues import PRIORITIES, Taker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    """A reply to send, and the raw frame it answers (to remove from the in-flight list)."""

    raw: bytes
    reply: Reply | None  # None: the frame had no reply address; it is only dropped


class WorkerBroker:
    def __init__(self, r: redis.Redis, settings: Settings, worker_id: str) -> None:
        self._r = r
        self._keys = settings.keys
        self._model = settings.served_name
        self._inflight = self._keys.inflight(worker_id)
        self._worker_key = self._keys.worker(worker_id)
        self._worker_id = worker_id
        self._ttl_ms = int(settings.worker_ttl_s * 1000)
        self._reply_ttl_ms = int(settings.reply_ttl_s * 1000)
        self._taker = Taker(r, self._keys, self._model, self._inflight)

    def take(self, max_items: int, block_s: float) -> list[bytes]:
        """Up to ``max_items`` frames, high priority first (low keeps a small share); blocks up to
        ``block_s`` when none wait. Every frame returned is already in the in-flight list."""
        return self._taker.take(max_items, block_s)

    @property
    def left(self) -> int:
        """Frames still queued in Redis behind the last ``take`` (for peers too)."""
        return self._taker.left

    def send(self, outgoing: Sequence[Outgoing], counters: Mapping[str, int]) -> None:
        """Every reply (RPUSH + PEXPIRE), the in-flight removals and the counters in one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for o in outgoing:
            if o.reply is not None:
                key = self._keys.reply(o.reply.id)
                pipe.rpush(key, encode_reply(o.reply))
                pipe.pexpire(key, self._reply_ttl_ms)
            pipe.lrem(self._inflight, 1, o.raw)  # type: ignore[arg-type]
        stats_key = self._keys.stats(self._model)
        for name, n in counters.items():
            if n:
                pipe.hincrby(stats_key, name, n)
                pipe.hincrby(self._worker_key, name, n)
        pipe.pexpire(self._worker_key, self._ttl_ms)
        pipe.execute()

    def register(self, fields: Mapping[str, str | int]) -> None:
        """Create or renew this worker's hash with its TTL, and list it in the workers set."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._worker_key, mapping=dict(fields))  # type: ignore[arg-type]
        pipe.pexpire(self._worker_key, self._ttl_ms)
        pipe.sadd(self._keys.workers(), self._worker_id)
        pipe.execute()

    def unregister(self) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._worker_key)
        pipe.srem(self._keys.workers(), self._worker_id)
        pipe.execute()

    def recover_dead(self, scan: bool = False) -> int:
        """Hand back the frames of workers whose registration expired; returns how many.

        Dead workers are found through the registry set (cheap, every heartbeat); ``scan`` also
        walks the keyspace for in-flight lists of workers the set no longer names. Each frame moves
        atomically into this worker's own in-flight list first, so two recovering peers never both
        take it; then, in one transaction, it goes back to the head of its queue (deadline not
        passed) or is answered with 504 (passed), and leaves the list.
        """
        ids = {_text(m) for m in self._r.smembers(self._keys.workers())}
        if scan:
            pattern = self._keys.inflight_pattern()
            ids |= {self._keys.worker_id_of_inflight(_text(k)) for k in self._r.scan_iter(match=pattern, count=500)}
        ids.discard(self._worker_id)
        moved = 0
        for wid in sorted(ids):
            if self._r.exists(self._keys.worker(wid)):
                continue
            dead_list = self._keys.inflight(wid)
            while (raw := self._r.lmove(dead_list, self._inflight, "RIGHT", "RIGHT")) is not None:
                self._requeue_or_expire(cast(bytes, raw))
                moved += 1
            self._r.srem(self._keys.workers(), wid)
        if moved:
            logger.warning("recovered %d in-flight frames from dead workers", moved)
        return moved

    def _requeue_or_expire(self, raw: bytes) -> None:
        pipe = self._r.pipeline(transaction=True)
        try:
            req = decode_request(raw)
        except FrameError as exc:
            logger.warning("dropping an undecodable in-flight frame of a dead worker: %s", exc.message)
            if exc.request_id:
                key = self._keys.reply(exc.request_id)
                pipe.rpush(key, encode_reply(Reply.failure(exc.request_id, exc)))
                pipe.pexpire(key, self._reply_ttl_ms)
        else:
            if req.expired(now_ms()):
                key = self._keys.reply(req.id)
                err = DeadlineExceeded("deadline passed while its worker was down")
                pipe.rpush(key, encode_reply(Reply.failure(req.id, err)))
                pipe.pexpire(key, self._reply_ttl_ms)
                pipe.hincrby(self._keys.stats(req.model), "expired", 1)
            else:
                # LPUSH: back at the head, ahead of newer work (frames come off the tail of the
                # dead list newest first, so the oldest ends up first); then ring the doorbell.
                priority = req.params.get("priority", "normal")
                pipe.lpush(self._keys.queue(req.model, priority if priority in PRIORITIES else "normal"), raw)
                pipe.rpush(self._keys.wake(req.model), "1")
        pipe.lrem(self._inflight, 1, raw)  # type: ignore[arg-type]
        pipe.execute()


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
