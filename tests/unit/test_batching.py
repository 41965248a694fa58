"""The batching policy, driven by a fake source and a fake clock: no sleeps, no Redis."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from worker.batching import Arrival, LocalBuffer, collect_batch


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    """Items that arrive at scheduled times; waiting advances the fake clock."""

    def __init__(self, clock: FakeClock, schedule: Sequence[tuple[float, str]]) -> None:
        self.clock = clock
        self.pending = sorted(schedule)
        self.waits: list[float] = []

    def take(self, max_items: int, timeout_s: float) -> list[Arrival[str]]:
        ready = [p for p in self.pending if p[0] <= self.clock.now]
        if not ready and timeout_s > 0:
            self.waits.append(timeout_s)
            nxt = self.pending[0][0] if self.pending else None
            if nxt is not None and nxt <= self.clock.now + timeout_s:
                self.clock.now = nxt
            else:
                self.clock.now += timeout_s
            ready = [p for p in self.pending if p[0] <= self.clock.now]
        got = ready[:max_items]
        for p in got:
            self.pending.remove(p)
        return [Arrival(item, t) for t, item in got]


def run(schedule: Sequence[tuple[float, str]], max_size: int, window: float, idle: float = 1.0):
    clock = FakeClock()
    src = FakeSource(clock, schedule)
    batch = collect_batch(src, max_size, window, clock, idle)
    return batch, clock.now, src


def test_never_more_than_max_size_and_oldest_first() -> None:
    batch, _, src = run([(0.0, f"r{i}") for i in range(10)], max_size=4, window=0.01)
    assert batch == ["r0", "r1", "r2", "r3"]
    assert len(src.pending) == 6  # the rest stays for the next batch


def test_full_batch_goes_at_once_without_waiting() -> None:
    batch, now, src = run([(0.0, "a"), (0.0, "b"), (0.0, "c")], max_size=3, window=0.5)
    assert batch == ["a", "b", "c"]
    assert now == 0.0 and src.waits == []


def test_batch_fills_from_late_arrivals_within_the_window() -> None:
    batch, now, _ = run([(0.0, "a"), (0.002, "b"), (0.004, "c")], max_size=3, window=0.010)
    assert batch == ["a", "b", "c"]
    assert now == pytest.approx(0.004)  # went the moment it was full, not at the window's end


def test_partial_batch_goes_when_the_window_closes() -> None:
    batch, now, src = run([(0.0, "a"), (0.003, "b"), (0.050, "late")], max_size=8, window=0.010)
    assert batch == ["a", "b"]
    assert now == pytest.approx(0.010)
    assert [item for _, item in src.pending] == ["late"]


def test_window_counts_from_the_first_arrival_so_queued_items_do_not_wait() -> None:
    # Both items arrived long before the worker looked (it was busy): nothing more is waited for.
    clock = FakeClock()
    clock.now = 1.0
    src = FakeSource(clock, [(0.0, "a"), (0.1, "b")])
    assert collect_batch(src, 8, 0.010, clock, 1.0) == ["a", "b"]
    assert clock.now == 1.0


def test_zero_window_takes_only_what_is_waiting() -> None:
    batch, now, _ = run([(0.0, "a"), (0.0, "b"), (0.001, "c")], max_size=8, window=0.0)
    assert batch == ["a", "b"]
    assert now == 0.0


def test_idle_source_produces_no_batch() -> None:
    clock = FakeClock()
    src = FakeSource(clock, [])
    for _ in range(5):
        assert collect_batch(src, 8, 0.005, clock, idle_timeout_s=0.5) == []
    assert clock.now == pytest.approx(2.5)  # it blocked for the idle timeout each time; no spinning


def test_first_item_is_waited_for_up_to_the_idle_timeout() -> None:
    batch, now, _ = run([(0.3, "a")], max_size=4, window=0.0, idle=1.0)
    assert batch == ["a"] and now == pytest.approx(0.3)


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        run([], max_size=0, window=0.0)


def test_local_buffer_is_fifo_and_reports_room() -> None:
    clock = FakeClock()
    buf: LocalBuffer[str] = LocalBuffer(capacity=3, clock=clock)
    assert buf.wait_for_room(0) == 3
    buf.put(["a", "b"])
    clock.now = 5.0
    buf.put(["c"])
    assert buf.wait_for_room(0) == 0
    got = buf.take(2, 0)
    assert [a.item for a in got] == ["a", "b"] and got[0].arrived_s == 0.0
    assert buf.wait_for_room(0) == 2
    assert [(a.item, a.arrived_s) for a in buf.take(5, 0)] == [("c", 5.0)]
    assert buf.take(5, 0) == []


def test_waiting_for_a_full_batch_ends_when_it_is_there_or_when_told_to_give_up() -> None:
    import threading

    buf: LocalBuffer[int] = LocalBuffer(capacity=10)
    buf.put([1, 2])
    assert not buf.wait_for(3, lambda: False, 0)  # two of three: no
    assert not buf.wait_for(3, lambda: True, 60)  # gives up at once, without waiting a minute
    filler = threading.Timer(0.05, buf.put, args=([3],))
    filler.start()
    assert buf.wait_for(3, lambda: False, 60)  # woken by the put
    done = threading.Event()
    waiter = threading.Thread(target=buf.wait_for, args=(9, done.is_set, 60))
    waiter.start()
    done.set()  # what a lane sees when the other lane finishes its pass
    buf.notify()
    waiter.join(5)
    assert not waiter.is_alive()


def test_collect_batch_over_a_local_buffer() -> None:
    clock = FakeClock()
    buf: LocalBuffer[int] = LocalBuffer(capacity=10, clock=clock)
    buf.put(list(range(7)))
    clock.now = 1.0  # the window (from the first arrival at 0.0) has long closed
    assert collect_batch(buf, 5, 0.01, clock, 0.1) == [0, 1, 2, 3, 4]
    assert collect_batch(buf, 5, 0.01, clock, 0.1) == [5, 6]


def test_bucket_sizes_are_powers_of_two_capped_by_the_max() -> None:
    from worker.batching import bucket_for, bucket_sizes

    assert bucket_sizes(1) == [1]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert bucket_sizes(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert [bucket_for(n, bucket_sizes(12)) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    assert bucket_for(7, []) == 7


def test_the_window_is_skipped_when_arrivals_are_rarer_than_it() -> None:
    from worker.batching import effective_window

    clock = FakeClock()
    buf: LocalBuffer[str] = LocalBuffer(capacity=64, clock=clock)
    assert effective_window(0.002, buf.mean_gap_s) == 0.002  # nothing known yet: batching pays under load
    for i in range(20):  # one closed-loop client: a request every 15 ms
        clock.now = i * 0.015
        buf.put([f"r{i}"])
    assert buf.mean_gap_s == pytest.approx(0.015, rel=0.02)
    assert effective_window(0.002, buf.mean_gap_s) == 0.0
    for i in range(40):  # then a burst: 8 requests every 4 ms, 0.5 ms apart on average
        clock.now += 0.004
        buf.put([f"b{i}-{j}" for j in range(8)])
    assert buf.mean_gap_s < 0.002
    assert effective_window(0.002, buf.mean_gap_s) == 0.002


def test_one_gap_of_a_lone_client_is_enough_to_stop_waiting() -> None:
    from worker.batching import effective_window

    clock = FakeClock()
    buf: LocalBuffer[str] = LocalBuffer(capacity=64, clock=clock)
    buf.put(["a"])
    assert effective_window(0.002, buf.mean_gap_s) == 0.002  # the first request may wait once
    clock.now = 0.015
    buf.put(["b"])
    assert effective_window(0.002, buf.mean_gap_s) == 0.0  # 15 ms apart: waiting does not pay
