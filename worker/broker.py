"""The one class through which the worker talks to Redis.

Every frame a worker takes is moved atomically from the model's queue into the worker's own
in-flight list, and leaves it only in the same pipeline that sends its reply: a worker that dies
leaves its unanswered frames in Redis, where a peer or its successor puts them back.

Frames leave the in-flight list without being sent back to Redis: the worker remembers the order
in which its takes appended them and, once the oldest ones are all answered, trims them off the
head (LTRIM). Only the worker pushes onto its list (a dead peer's frames pass through a recovering
list of their own); anyone else takes from it only when the worker's registration has expired (a
peer recovering the frames of a worker it believes dead). So the trim runs in a small script that
first checks the registration's ``epoch``, a random value the first registration set: a hash that
expired and was created again holds another, and then the script trims nothing, and the worker
removes every frame by value from then on (LREM, which sends the frame back: for a 90-150 KB frame
more bytes than the rest of its reply, and Redis's CPU to read and compare them). A worker that
never registered removes by value too.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import redis

from common.config import Settings
from common.errors import DeadlineExceeded, FrameError
from common.protocol import Reply, decode_request, encode_reply, now_ms
from common.queues import PRIORITIES, Taker
from common.resp import Link

logger = logging.getLogger(__name__)


# KEYS: the in-flight list, the worker's hash. ARGV: k, the epoch its first registration set.
# Trims the first k frames while that registration has lived on; returns 1 if it trimmed, else 0.
_TRIM_HEAD = """
if redis.call('HGET', KEYS[2], 'epoch') == ARGV[2] then
  redis.call('LTRIM', KEYS[1], tonumber(ARGV[1]), -1)
  return 1
end
return 0
"""
MAX_REMEMBERED = 8192  # answered frames waiting behind an unanswered one, at most (then: by value)
# A dead peer's frames pass through a list of the recovering worker's own, never its in-flight
# list, onto which only its own takes push (the module's docstring).
RECOVERING = "~recovering"


@dataclass(eq=False)
class _Taken:
    raw: bytes
    answered: bool = False


@dataclass
class _InFlight:
    """This worker's picture of its in-flight list: the frames its takes appended, oldest first."""

    order: deque[_Taken] = field(default_factory=deque)
    by_id: dict[int, _Taken] = field(default_factory=dict)  # id(raw) of the frames not yet answered
    exact: bool = False  # True from the first registration until a trim finds it lapsed


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
        self._recovering = self._keys.inflight(worker_id + RECOVERING)
        self._worker_key = self._keys.worker(worker_id)
        self._worker_id = worker_id
        self._ttl_ms = int(settings.worker_ttl_s * 1000)
        self._reply_ttl_ms = int(settings.reply_ttl_s * 1000)
        self._taker = Taker(r, self._keys, self._model, self._inflight)
        self._link = Link(r)  # the reply round trip without redis-py's pipeline (common/resp.py)
        self._mine = _InFlight()
        self._epoch = ""  # the first registration's (``_TRIM_HEAD``)
        self._mine_lock = threading.Lock()  # the picture (taker and repliers)
        self._send_lock = threading.Lock()  # one reply pipeline at a time, so trims reach Redis in order

    def take(self, max_items: int, block_s: float) -> list[bytes]:
        """Up to ``max_items`` frames, high priority first (low keeps a small share); blocks up to
        ``block_s`` when none wait. Every frame returned is already in the in-flight list."""
        frames = self._taker.take(max_items, block_s)
        with self._mine_lock:
            if self._mine.exact:
                for f in frames:
                    t = _Taken(f)
                    self._mine.order.append(t)
                    self._mine.by_id[id(f)] = t
        return frames

    @property
    def left(self) -> int:
        """Frames still queued in Redis behind the last ``take`` (for peers too)."""
        return self._taker.left

    def send(self, outgoing: Sequence[Outgoing], counters: Mapping[str, int]) -> None:
        """Every reply (RPUSH + PEXPIRE), the in-flight removals and the counters in one round trip
        (one write, ``common/resp.py``).
        Answered frames at the head of the in-flight list are trimmed off it; any other frame this
        worker did not take in order, or all once the list was found changed, is removed by value."""
        with self._send_lock:
            cmds: list[tuple[object, ...]] = []
            for o in outgoing:
                if o.reply is not None:
                    key = self._keys.reply(o.reply.id)
                    cmds += [("RPUSH", key, encode_reply(o.reply)), ("PEXPIRE", key, self._reply_ttl_ms)]
            trimmed, by_value = self._answered([o.raw for o in outgoing])
            trim_at = len(cmds)
            if trimmed:
                cmds.append(("EVAL", _TRIM_HEAD, 2, self._inflight, self._worker_key, len(trimmed), self._epoch))
            cmds += [("LREM", self._inflight, 1, raw) for raw in by_value]
            stats_key = self._keys.stats(self._model)
            for name, n in counters.items():
                if n:
                    cmds += [("HINCRBY", stats_key, name, n), ("HINCRBY", self._worker_key, name, n)]
            cmds.append(("PEXPIRE", self._worker_key, self._ttl_ms))
            results = self._link.exchange(cmds)
            if trimmed and results[trim_at] != 1:
                self._lost_track(trimmed)
            elif len(self._mine.order) > MAX_REMEMBERED:  # an unanswered frame holds the head for long
                self._lost_track([])

    def _answered(self, raws: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
        """Mark ``raws`` answered; the frames now answered at the head of the list (to trim, oldest
        first), and those to remove by value."""
        with self._mine_lock:
            mine = self._mine
            by_value = []
            for raw in raws:
                t = mine.by_id.pop(id(raw), None)
                if t is None or t.raw is not raw:
                    by_value.append(raw)
                else:
                    t.answered = True
            trimmed = []
            while mine.order and mine.order[0].answered:
                trimmed.append(mine.order.popleft().raw)
            return trimmed, by_value

    def _lost_track(self, trimmed: list[bytes]) -> None:
        """This worker's registration lapsed (peers may have taken frames from its list), or too
        many answered frames wait behind an unanswered one: remove ``trimmed`` and every answered
        frame still remembered by value, and every frame by value from now on."""
        with self._mine_lock:
            waiting = [t.raw for t in self._mine.order if t.answered]
            self._mine = _InFlight(exact=False)
        logger.warning("lost track of the in-flight list %s: frames leave it by value from now on", self._inflight)
        pipe = self._r.pipeline(transaction=False)
        for raw in trimmed + waiting:
            pipe.lrem(self._inflight, 1, raw)  # type: ignore[arg-type]
        pipe.execute()

    def register(self, fields: Mapping[str, str | int]) -> None:
        """Create or renew this worker's hash with its TTL, and list it in the workers set. A hash
        created anew gets a fresh ``epoch``; the first one's lets this worker trim its in-flight list."""
        epoch = uuid.uuid4().hex
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self._worker_key, mapping=dict(fields))  # type: ignore[arg-type]
        pipe.hsetnx(self._worker_key, "epoch", epoch)
        pipe.pexpire(self._worker_key, self._ttl_ms)
        pipe.sadd(self._keys.workers(), self._worker_id)
        created = pipe.execute()[1]
        if created and not self._epoch:
            with self._mine_lock:
                self._epoch = epoch
                self._mine.exact = True

    def unregister(self) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._worker_key)
        pipe.srem(self._keys.workers(), self._worker_id)
        pipe.execute()

    def recover_dead(self, scan: bool = False) -> int:
        """Hand back the frames of workers whose registration expired; returns how many.

        Dead workers are found through the registry set (cheap, every heartbeat); ``scan`` also
        walks the keyspace for in-flight lists of workers the set no longer names (and for a dead
        worker's own recovering list). Each frame moves atomically into this worker's recovering
        list first, so two recovering peers never both take it; then, in one transaction, it goes
        back to the head of its queue (deadline not passed) or is answered with 504 (passed), and
        leaves that list.
        """
        ids = {_text(m) for m in self._r.smembers(self._keys.workers())}
        if scan:
            pattern = self._keys.inflight_pattern()
            ids |= {self._keys.worker_id_of_inflight(_text(k)) for k in self._r.scan_iter(match=pattern, count=500)}
        ids -= {self._worker_id, self._worker_id + RECOVERING}
        moved = 0
        for wid in sorted(ids):
            if self._r.exists(self._keys.worker(wid.removesuffix(RECOVERING))):  # a live owner's list
                continue
            dead_list = self._keys.inflight(wid)
            while (raw := self._r.lmove(dead_list, self._recovering, "RIGHT", "RIGHT")) is not None:
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
        pipe.lrem(self._recovering, 1, raw)  # type: ignore[arg-type]
        pipe.execute()


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
