"""The queue of a model: three priority lists and a doorbell, and the two Lua scripts that admit
and plan the moves of frames through them. Used by the API (enqueue) and the worker (take).

Keys (``Keys``): ``queue(model, "high")``, ``queue(model)`` (normal), ``queue(model, "low")`` and
``wake(model)``. A worker cannot block on three lists and move what it pops into its in-flight list
in one atomic step (BLMOVE takes one source), so it blocks on the doorbell instead: every enqueue
rings it (a one-element list), and every take moves frames from the queues into the worker's
in-flight list, each atomically (LMOVE), re-ringing the bell while frames remain so an idle peer
wakes too.
"""

from __future__ import annotations

import random
from typing import cast

import redis

from common.keys import Keys
from common.resp import Link

PRIORITIES = ("high", "normal", "low")
LOW_SHARE = 0.1  # with low-priority frames waiting, about this share of each take goes to them
MIN_BLOCK_S = 0.01  # BLPOP's timeout 0 means forever: never send it

# Frames never pass through Lua: a 90 KB string read into a script and written back out cost Redis
# about three times a plain RPUSH or LMOVE of it (CPU of the redis-server process, docs/benchmarks.md),
# so the scripts below only count, decide and ring, and plain list commands move the frames.

# KEYS: high, normal, low, wake[, reply]. ARGV: the list index (1..3) the frame was just pushed onto,
# bound[, reply TTL ms]. Runs in one MULTI right after the frame's RPUSH, so the frame is that list's
# tail. Over the bound the frame is dropped again (LTRIM of the tail) and, given a reply key, refused
# there (FULL), so a BLPOP the caller pipelined behind it returns at once; else the doorbell is rung.
# Returns the new total, or -1 when refused.
_ADMIT = """
local total = redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3])
if total > tonumber(ARGV[2]) then
  redis.call('LTRIM', KEYS[tonumber(ARGV[1])], 0, -2)
  if KEYS[5] then
    redis.call('RPUSH', KEYS[5], '!full')
    redis.call('PEXPIRE', KEYS[5], ARGV[3])
  end
  return -1
end
if redis.call('LLEN', KEYS[4]) == 0 then redis.call('RPUSH', KEYS[4], '1') end
return total
"""
FULL = b"!full"  # the reply key's answer to a frame refused at the queue's bound (never a msgpack map)

# KEYS: high, normal, low, wake. ARGV: n, low share, a random number in [0, 1).
# How many of up to n frames to take from each list: high first, then normal, then low; while low
# frames wait, n * share slots (rounded at random, so the share holds on average) are kept for them, so
# low is never starved. Rings the doorbell again when frames will remain (an idle peer wakes), else
# clears it. Returns {high, normal, low, left}: the taker then moves that many with LMOVE, and
# ``left`` frames stay queued behind them.
_PLAN = """
local n = tonumber(ARGV[1])
local len = {redis.call('LLEN', KEYS[1]), redis.call('LLEN', KEYS[2]), redis.call('LLEN', KEYS[3])}
local reserve = 0
if len[3] > 0 then
  local want = n * tonumber(ARGV[2])
  reserve = math.floor(want)
  if tonumber(ARGV[3]) < want - reserve then reserve = reserve + 1 end
end
local take = {0, 0, 0}
local function add(i, k)
  local got = math.max(0, math.min(len[i] - take[i], k))
  take[i] = take[i] + got
end
add(1, n - reserve)
add(2, n - reserve - take[1])
add(3, n - take[1] - take[2])
add(1, n - take[1] - take[2] - take[3])
add(2, n - take[1] - take[2] - take[3])
local left = len[1] + len[2] + len[3] - take[1] - take[2] - take[3]
if left > 0 then
  if redis.call('LLEN', KEYS[4]) == 0 then redis.call('RPUSH', KEYS[4], '1') end
else
  redis.call('DEL', KEYS[4])
end
return {take[1], take[2], take[3], left}
"""


def block_timeout(block_s: float) -> str:
    """A blocking command's timeout in seconds, never 0 (which blocks forever)."""
    return f"{max(block_s, MIN_BLOCK_S):.3f}"


def queue_keys(keys: Keys, model: str) -> list[str]:
    """The model's lists in the order they are served: high, normal, low."""
    return [keys.queue(model, p) for p in PRIORITIES]


def priority_index(priority: str) -> int:
    """1-based index of ``priority`` among PRIORITIES; raises ValueError for anything else."""
    return PRIORITIES.index(priority) + 1


class Enqueuer:
    """The API's side: a bounded, atomic push that rings the doorbell."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self._r = r
        self._keys = keys

    def push(self, model: str, frame: bytes, priority: str, bound: int) -> int:
        """Queue ``frame``; returns the model's queue length after it, or -1 when at ``bound``."""
        pipe = self._r.pipeline(transaction=True)
        for cmd in self.commands(model, frame, priority, bound)[1:-1]:
            pipe.execute_command(*cmd)  # type: ignore[no-untyped-call]
        return admitted(pipe.execute(raise_on_error=False))

    def commands(
        self, model: str, frame: bytes, priority: str, bound: int, reply: str | None = None, ttl_ms: int = 0
    ) -> list[tuple[object, ...]]:
        """The push of ``frame`` as MULTI, RPUSH, EVAL (the admission script), EXEC: for a pipeline
        that blocks on ``reply`` behind it, where a frame refused at the bound is answered with
        ``FULL``. ``admitted`` reads EXEC's answer. EVAL with the script's text, so a Redis that
        restarted (no cached scripts) still runs it."""
        index = priority_index(priority)
        keys = self._queue_keys(model) + ([reply] if reply else [])
        return [
            ("MULTI",),
            ("RPUSH", keys[index - 1], frame),
            ("EVAL", _ADMIT, len(keys), *keys, index, bound, *([ttl_ms] if reply else [])),
            ("EXEC",),
        ]

    def _queue_keys(self, model: str) -> list[str]:
        return [*queue_keys(self._keys, model), self._keys.wake(model)]


def admitted(exec_reply: object) -> int:
    """The queue length after a push, or -1 when refused, from the EXEC (or transaction) answer of
    ``Enqueuer.commands``; raises ``redis.ResponseError`` if Redis refused a command in it."""
    if not isinstance(exec_reply, list) or len(exec_reply) != 2:
        raise redis.ResponseError(f"unexpected answer to an enqueue: {exec_reply!r}")
    for part in exec_reply:
        if isinstance(part, Exception):
            raise redis.ResponseError(str(part))
    return int(exec_reply[1])


class Taker:
    """The worker's side: take frames into an in-flight list, blocking on the doorbell when idle."""

    def __init__(self, r: redis.Redis, keys: Keys, model: str, inflight: str) -> None:
        self._link = Link(r)  # a round trip without redis-py's pipeline (common/resp.py)
        self._wake = keys.wake(model)
        self._queues = queue_keys(keys, model)
        self._plan_keys = [*self._queues, self._wake]
        self._inflight = inflight
        self.left = 0  # frames still queued behind the last take (all priorities; peers may take them)

    def take(self, n: int, block_s: float) -> list[bytes]:
        """Up to ``n`` frames, each moved atomically into the in-flight list; when none are waiting,
        block up to ``block_s`` on the doorbell.

        Two round trips. The first carries a BLPOP on the doorbell and the plan script behind it:
        Redis runs the script once the BLPOP returns, at once while frames wait (the bell is rung
        then) or when the next enqueue rings it, and answers how many frames to take from each list.
        The second moves them, one LMOVE each: a frame is always in a queue or in the in-flight list,
        and one a peer took in between is a nil skipped. A frame pushed without ringing (by hand with
        redis-cli, say) is taken when the BLPOP times out, at most ``block_s`` later.
        """
        keys = self._plan_keys
        plan_cmd = ("EVAL", _PLAN, len(keys), *keys, n, LOW_SHARE, random.random())
        answers = self._link.exchange([("BLPOP", self._wake, block_timeout(block_s)), plan_cmd])
        *plan, left = cast(list[int], answers[1])
        self.left = int(left)
        if not any(plan):
            return []
        moves = [("LMOVE", q, self._inflight, "LEFT", "RIGHT") for q, k in zip(self._queues, plan) for _ in range(k)]
        return [f for f in cast(list[bytes | None], self._link.exchange(moves)) if f is not None]
