"""The one class through which the worker talks to Redis.

Every frame a worker takes is moved atomically from the model's queue into the worker's own
in-flight list, and leaves it only in the same pipeline that sends its reply: a worker that dies
leaves its unanswered frames in Redis, where a peer or its successor puts them back.

Frames leave the in-flight list without being sent back to Redis: the worker remembers the order
in which its takes appended them, and once the oldest ones are all answered, trims them off the
head (LTRIM), after a script has checked that the last of them is where the worker remembers it
(by length and first bytes, which hold the request id). Only this worker pushes onto its list
(a dead peer's frames pass through a recovering list of their own), and anyone else only pops
from its tail, newest first (a peer that believes this worker dead): a frame gone from the
remembered prefix shifts the ones after it, so the check fails. Then the list was changed behind
the worker's back, and from then on every frame leaves by value (LREM, which sends the frame back:
for a 90-150 KB frame more bytes than the rest of its reply, and Redis's CPU to read and compare
them). A prefix of one or two frames leaves by value too, which is cheaper for Redis then.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import redis

from common.config import Settings
from common.errors import DeadlineExceeded, FrameError
from common.protocol import Reply, decode_request, encode_reply, now_ms
from common.queues import PRIORITIES, Taker

logger = logging.getLogger(__name__)


# KEYS: the in-flight list. ARGV: k, then the length and the first bytes of the k-th frame this
# worker remembers. Trims the first k frames when the k-th is where it should be; returns 1 if it
# trimmed, 0 if not (then nothing changed). One frame passes through Lua per trim, not per frame.
_TRIM_HEAD = """
local k = tonumber(ARGV[1])
local last = redis.call('LINDEX', KEYS[1], k - 1)
if last and #last == tonumber(ARGV[2]) and string.sub(last, 1, #ARGV[3]) == ARGV[3] then
  redis.call('LTRIM', KEYS[1], k, -1)
  return 1
end
return 0
"""
# Fewer answered frames than this at the head leave by value: a frame copied into Lua cost Redis
# more CPU than reading one sent with LREM (docs/benchmarks.md).
TRIM_MIN = 3
HEAD_BYTES = 128  # a frame's first bytes hold its request id
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
    exact: bool = True  # False once a trim found the list changed: removal by value from then on


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
        self._mine = _InFlight()
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
        """Every reply (RPUSH + PEXPIRE), the in-flight removals and the counters in one round trip.
        Answered frames at the head of the in-flight list are trimmed off it; any other frame this
        worker did not take in order, or all once the list was found changed, is removed by value."""
        with self._send_lock:
            pipe = self._r.pipeline(transaction=False)
            for o in outgoing:
                if o.reply is not None:
                    key = self._keys.reply(o.reply.id)
                    pipe.rpush(key, encode_reply(o.reply))
                    pipe.pexpire(key, self._reply_ttl_ms)
            trimmed, by_value = self._answered([o.raw for o in outgoing])
            if len(trimmed) < TRIM_MIN:  # at the head: LREM finds them first
                by_value, trimmed = trimmed + by_value, []
            trim_at = len(pipe)
            if trimmed:
                last = trimmed[-1]
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "EVAL", _TRIM_HEAD, 1, self._inflight, len(trimmed), len(last), last[:HEAD_BYTES]
                )
            for raw in by_value:
                pipe.lrem(self._inflight, 1, raw)  # type: ignore[arg-type]
            stats_key = self._keys.stats(self._model)
            for name, n in counters.items():
                if n:
                    pipe.hincrby(stats_key, name, n)
                    pipe.hincrby(self._worker_key, name, n)
            pipe.pexpire(self._worker_key, self._ttl_ms)
            results = pipe.execute()
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
        """The head of the in-flight list was not what this worker remembered (a peer took frames
        while it was thought dead, say), or too many answered frames wait behind an unanswered
        one: remove ``trimmed`` and every answered frame still remembered by value, and remove
        every frame by value from now on."""
        with self._mine_lock:
            waiting = [t.raw for t in self._mine.order if t.answered]
            self._mine = _InFlight(exact=False)
        logger.warning("lost track of the in-flight list %s: frames leave it by value from now on", self._inflight)
        pipe = self._r.pipeline(transaction=False)
        for raw in trimmed + waiting:
            pipe.lrem(self._inflight, 1, raw)  # type: ignore[arg-type]
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
