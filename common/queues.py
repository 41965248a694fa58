"""The queue of a model: three priority lists and a doorbell, and the two Lua scripts that move
frames through them atomically. Used by the API (enqueue) and the worker (take).

Keys (``Keys``): ``queue(model, "high")``, ``queue(model)`` (normal), ``queue(model, "low")`` and
``wake(model)``. A worker cannot block on three lists and move what it pops into its in-flight list
in one atomic step (BLMOVE takes one source), so it blocks on the doorbell instead: every enqueue
rings it (a one-element list), and every take moves frames from the queues into the worker's
in-flight list atomically, re-ringing the bell while frames remain so an idle peer wakes too.
"""

from __future__ import annotations

import random
from typing import cast

import redis

from common.keys import Keys

PRIORITIES = ("high", "normal", "low")
LOW_SHARE = 0.1  # with low-priority frames waiting, about this share of each take goes to them
MIN_BLOCK_S = 0.01  # BLPOP's timeout 0 means forever: never send it

# KEYS: high, normal, low, wake[, reply]. ARGV: frame, list index (1..3), bound[, reply TTL ms].
# Returns the new total, or -1 when the queue is at its bound; given a reply key, a refused frame
# is also answered there (FULL), so a BLPOP the caller pipelined behind the script returns at once.
_ENQUEUE = """
local total = redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3])
if total >= tonumber(ARGV[3]) then
  if KEYS[5] then
    redis.call('RPUSH', KEYS[5], '!full')
    redis.call('PEXPIRE', KEYS[5], ARGV[4])
  end
  return -1
end
redis.call('RPUSH', KEYS[tonumber(ARGV[2])], ARGV[1])
if redis.call('LLEN', KEYS[4]) == 0 then redis.call('RPUSH', KEYS[4], '1') end
return total + 1
"""
FULL = b"!full"  # the reply key's answer to a frame refused at the queue's bound (never a msgpack map)

# KEYS: high, normal, low, inflight, wake. ARGV: n, low share, a random number in [0, 1).
# Takes up to n frames, high first, then normal, then low; while low frames wait, n * share slots
# (rounded at random, so the share holds on average) are kept for them, so low is never starved.
_TAKE = """
local n = tonumber(ARGV[1])
local out = {}
local reserve = 0
if redis.call('LLEN', KEYS[3]) > 0 then
  local want = n * tonumber(ARGV[2])
  reserve = math.floor(want)
  if tonumber(ARGV[3]) < want - reserve then reserve = reserve + 1 end
end
local function take(key, k)
  if k <= 0 then return end
  local items = redis.call('LPOP', key, k)
  if items then for _, v in ipairs(items) do out[#out + 1] = v end end
end
take(KEYS[1], n - reserve - #out)
take(KEYS[2], n - reserve - #out)
take(KEYS[3], n - #out)
take(KEYS[1], n - #out)
take(KEYS[2], n - #out)
if #out > 0 then redis.call('RPUSH', KEYS[4], unpack(out)) end
if redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2]) + redis.call('LLEN', KEYS[3]) > 0 then
  if redis.call('LLEN', KEYS[5]) == 0 then redis.call('RPUSH', KEYS[5], '1') end
else
  redis.call('DEL', KEYS[5])
end
return out
"""


def queue_keys(keys: Keys, model: str) -> list[str]:
    """The model's lists in the order they are served: high, normal, low."""
    return [keys.queue(model, p) for p in PRIORITIES]


def priority_index(priority: str) -> int:
    """1-based index of ``priority`` among PRIORITIES; raises ValueError for anything else."""
    return PRIORITIES.index(priority) + 1


class Enqueuer:
    """The API's side: a bounded, atomic push that rings the doorbell."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self._keys = keys
        self._script = r.register_script(_ENQUEUE)

    def push(self, model: str, frame: bytes, priority: str, bound: int) -> int:
        """Queue ``frame``; returns the model's queue length after it, or -1 when at ``bound``."""
        return int(self._script(keys=self._queue_keys(model), args=[frame, priority_index(priority), bound]))

    def command(
        self, model: str, frame: bytes, priority: str, bound: int, reply: str, ttl_ms: int
    ) -> tuple[object, ...]:
        """The push of ``frame`` as one command for a pipeline that blocks on ``reply`` behind it: a
        frame refused at the bound is answered there with ``FULL`` (and the command returns -1).
        EVAL with the script's text, so a Redis that restarted (no cached scripts) still runs it."""
        keys = [*self._queue_keys(model), reply]
        return ("EVAL", _ENQUEUE, len(keys), *keys, frame, priority_index(priority), bound, ttl_ms)

    def _queue_keys(self, model: str) -> list[str]:
        return [*queue_keys(self._keys, model), self._keys.wake(model)]


class Taker:
    """The worker's side: take frames into an in-flight list, blocking on the doorbell when idle."""

    def __init__(self, r: redis.Redis, keys: Keys, model: str, inflight: str) -> None:
        self._r = r
        self._wake = keys.wake(model)
        self._keys = [*queue_keys(keys, model), inflight, self._wake]

    def take(self, n: int, block_s: float) -> list[bytes]:
        """Up to ``n`` frames; when none are waiting, block up to ``block_s`` on the doorbell.

        One round trip, busy or idle: one write carries a BLPOP on the doorbell and the take script
        behind it. Redis runs the script once the BLPOP returns: at once while frames wait (the
        bell is rung then), or when the next enqueue rings it. A frame pushed without ringing (by
        hand with redis-cli, say) is taken when the BLPOP times out, at most ``block_s`` later.
        The script's text travels with it (EVAL), so a restarted Redis needs no reload.
        """
        pipe = self._r.pipeline(transaction=False)
        pipe.blpop([self._wake], timeout=max(block_s, MIN_BLOCK_S))
        pipe.execute_command("EVAL", _TAKE, len(self._keys), *self._keys, n, LOW_SHARE, random.random())  # type: ignore[no-untyped-call]
        return cast(list[bytes], pipe.execute()[1])
