"""How many torch threads each batch size runs on (a CPU worker's thread plan).

A pass over a few images, made of hundreds of short operators, can lose more to the second
thread's synchronisation than it gains (and to a wake-up at every operator where OpenMP's threads
sleep at once: ``redbatch worker`` lets them spin briefly, ``common/cli.py``), while a large
batch gains. So the worker times each batch size it may run with one thread and with all of them
at start-up, and runs each size the faster way.

``calibrate`` and ``choose_threads`` are pure (a runner, a thread setter and a clock are passed
in), so tests drive them with fakes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Samples = Mapping[int, Mapping[int, Sequence[float]]]  # batch size -> thread count -> seconds per pass

# More threads must win by this much to be chosen. Timed in isolation, a close call hides what
# serving adds: the second core also decodes, runs the API and Redis. mobilenet_v3_small's batches
# of 16 and 32 timed within 2 % on one thread and two here, and served 2-18 % more with one thread
# always than with two for those sizes (three alternating rounds, docs/benchmarks.md).
MARGIN = 0.1


def medians(samples: Samples) -> dict[int, dict[int, float]]:
    """Each batch size's median seconds per pass, by thread count: what ``choose_threads`` compares."""
    return {size: {n: statistics.median(v) for n, v in by.items()} for size, by in samples.items()}


def choose_threads(samples: Samples, margin: float = MARGIN) -> dict[int, int]:
    """For each batch size, the thread count with the lowest median time; a higher count only when
    it beats every lower one by more than ``margin`` (a fraction)."""
    plan: dict[int, int] = {}
    for size, by_threads in medians(samples).items():
        best_n, best_s = 0, float("inf")
        for n in sorted(by_threads):
            med = by_threads[n]
            if not best_n or med < best_s * (1.0 - margin):
                best_n, best_s = n, med
        if best_n:
            plan[size] = best_n
    return plan


def calibrate(
    run: Callable[[int], object],
    set_threads: Callable[[int], object],
    sizes: Sequence[int],
    thread_counts: Sequence[int],
    reps: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, dict[int, list[float]]]:
    """Time ``run(size)`` for each size under each thread count, ``reps`` times, the counts
    interleaved (1, N, 1, N, ...) so that a drift in the machine's speed hits both alike; one
    uncounted pass per size first (a new shape's first pass allocates)."""
    samples: dict[int, dict[int, list[float]]] = {s: {n: [] for n in thread_counts} for s in sizes}
    for size in sizes:
        set_threads(thread_counts[-1])
        run(size)
        for _ in range(reps):
            for n in thread_counts:
                set_threads(n)
                t0 = clock()
                run(size)
                samples[size][n].append(clock() - t0)
    return samples


@dataclass(frozen=True)
class ThreadPlan:
    """Thread count per calibrated batch size; a batch of ``n`` uses the plan of the smallest
    calibrated size that holds it (the largest one beyond that)."""

    by_size: Mapping[int, int]

    def for_batch(self, n: int) -> int:
        sizes = sorted(self.by_size)
        return self.by_size[next((s for s in sizes if s >= n), sizes[-1])]

    def describe(self) -> str:
        """``size:threads`` pairs, e.g. ``1:1,2:1,4:1,8:2``: what the worker registers in Redis."""
        return ",".join(f"{s}:{self.by_size[s]}" for s in sorted(self.by_size))
