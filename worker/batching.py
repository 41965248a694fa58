"""The batching policy (what to take, when to go), and the in-process buffer it runs on.

``collect_batch`` is pure: it sees a ``BatchSource`` and a clock, so tests drive it with a fake
source and a fake clock, no sleeps and no Redis.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

Clock = Callable[[], float]


@dataclass(frozen=True)
class Arrival(Generic[T]):
    """An item and the monotonic time (seconds) it reached this worker."""

    item: T
    arrived_s: float


class BatchSource(Protocol[T]):
    def take(self, max_items: int, timeout_s: float) -> Sequence[Arrival[T]]:
        """Up to ``max_items`` waiting items, oldest first.

        Returns at once when any are waiting; otherwise waits up to ``timeout_s`` for the first
        and returns what is there then (possibly nothing). ``timeout_s <= 0`` never waits.
        """
        ...


def collect_batch(
    source: BatchSource[T], max_size: int, window_s: float, clock: Clock, idle_timeout_s: float
) -> list[T]:
    """Form one batch: wait up to ``idle_timeout_s`` for a first item, then fill up.

    Contract:
    - returns ``[]`` when nothing arrived within ``idle_timeout_s`` (the caller runs nothing);
    - never returns more than ``max_size`` items, oldest first;
    - returns as soon as ``max_size`` items are in hand;
    - otherwise waits for more until ``window_s`` after the *first item's arrival*, so items that
      waited while the model was busy go at once: the window is a ceiling, not a sleep.
    """
    if max_size < 1:
        raise ValueError("max_size must be at least 1")
    got = list(source.take(max_size, idle_timeout_s))
    if not got:
        return []
    closes_at = got[0].arrived_s + window_s
    while len(got) < max_size:
        remaining = closes_at - clock()
        more = source.take(max_size - len(got), max(remaining, 0.0))
        if not more:
            break
        got.extend(more)
    return [a.item for a in got]


def effective_window(window_s: float, mean_gap_s: float) -> float:
    """The window worth waiting for a partial batch: the configured one while items arrive on
    average at least once per window, none when they come rarer than that. A lone request on a
    quiet worker (one closed-loop client, say) then goes at once instead of waiting for company
    that is unlikely to come; under load, batches fill before the window matters anyway."""
    return window_s if mean_gap_s <= window_s else 0.0


def bucket_sizes(max_size: int) -> list[int]:
    """Powers of two below ``max_size``, then ``max_size``: the shapes a padded batch can take."""
    sizes, b = [], 1
    while b < max_size:
        sizes.append(b)
        b *= 2
    return [*sizes, max_size]


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` items (``n`` itself when none does)."""
    return next((b for b in buckets if b >= n), n)


class LocalBuffer(Generic[T]):
    """Thread-safe FIFO between the thread that pops Redis and the thread that runs the model.

    Bounded to ``capacity`` items so that a worker never hoards more than one batch ahead of the
    forward pass: everything beyond that stays in Redis for peers.
    """

    def __init__(self, capacity: int, clock: Clock = time.monotonic) -> None:
        self._items: deque[Arrival[T]] = deque()
        self._capacity = capacity
        self._clock = clock
        self._cond = threading.Condition()
        self._closed = False
        self._last_put_s: float | None = None
        self._mean_gap_s = 0.0  # start by assuming traffic worth batching; the first gaps correct it

    def put(self, items: Sequence[T]) -> None:
        now = self._clock()
        with self._cond:
            # Items popped together arrived (nearly) together: gaps of 0 after the first.
            gaps = [now - self._last_put_s] if self._last_put_s is not None and items else []
            for gap in gaps + [0.0] * max(len(items) - 1, 0):
                self._mean_gap_s = 0.8 * self._mean_gap_s + 0.2 * gap
            self._last_put_s = now
            self._items.extend(Arrival(it, now) for it in items)
            self._cond.notify_all()

    @property
    def mean_gap_s(self) -> float:
        """Moving average of the time between arrivals (0 until the first gaps are seen)."""
        with self._cond:
            return self._mean_gap_s

    def wait_for_room(self, timeout_s: float) -> int:
        """Block until fewer than ``capacity`` items are buffered; return the free room (0 on timeout)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._items) < self._capacity or self._closed, timeout_s)
            return max(self._capacity - len(self._items), 0)

    def wait_for(self, count: int, give_up: Callable[[], bool], timeout_s: float) -> bool:
        """Block until ``count`` items are buffered (True), or until ``give_up()`` holds, the
        buffer closes or ``timeout_s`` passes (False). ``give_up`` is checked on every put, take
        and ``notify``."""
        with self._cond:
            return (
                self._cond.wait_for(lambda: len(self._items) >= count or self._closed or give_up(), timeout_s)
                and len(self._items) >= count
            )

    def notify(self) -> None:
        """Wake the waiters of ``wait_for``, so they check their ``give_up`` again."""
        with self._cond:
            self._cond.notify_all()

    def take(self, max_items: int, timeout_s: float) -> list[Arrival[T]]:
        with self._cond:
            if not self._items and timeout_s > 0 and not self._closed:
                self._cond.wait_for(lambda: bool(self._items) or self._closed, timeout_s)
            n = min(max_items, len(self._items))
            out = [self._items.popleft() for _ in range(n)]
            if out:
                self._cond.notify_all()
            return out

    def close(self) -> None:
        """Wake every waiter; later takes return what is left without waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
