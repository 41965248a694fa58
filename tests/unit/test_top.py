"""``redbatch top``'s pure parts: rates from two snapshots, and the screen they render."""

from __future__ import annotations

import json

from common.registry import WorkerInfo
from common.top import Snapshot, rates, render


def worker(wid: str, model: str, device: str, counters: dict[str, int], **fields: str) -> WorkerInfo:
    f = {"model": model, "device": device, "max_batch_size": "32", "batch_cap": "32", "dtype": "float16",
         "host": "gpu1", "pid": "4242", "heartbeat_ms": "1000000", "spec": json.dumps({}), **fields}  # fmt: skip
    f.update({k: str(v) for k, v in counters.items()})
    return WorkerInfo(id=wid, model=model, device=device, max_batch_size=32, spec={}, fields=f)


def snap(at_s: float, counts: dict[str, int], w_counters: dict[str, int], **kw: object) -> Snapshot:
    defaults: dict[str, object] = {
        "wall_ms": 1_000_400,
        "queues": {"resnet18": 12, "resnet18:high": 3},
        "workers": [worker("w-a", "resnet18", "cuda:0", w_counters)],
        "inflight": {"w-a": 16},
        "stats": {"resnet18": counts},
        "replies": 2,
    }
    return Snapshot(at_s=at_s, **{**defaults, **kw})  # type: ignore[arg-type]


def test_rates_are_differences_per_second() -> None:
    r = rates({"requests": 100, "items": 90, "batches": 10}, {"requests": 300, "items": 290, "batches": 20}, 2.0)
    assert (r.requests_per_s, r.items_per_s, r.batches_per_s) == (100.0, 100.0, 5.0)
    assert r.mean_batch == 20.0  # 200 items in 10 forward passes


def test_rates_from_a_counter_that_appeared_or_was_reset_count_from_zero() -> None:
    assert rates({}, {"requests": 10, "items": 10, "batches": 2}, 1.0).requests_per_s == 10.0
    assert rates({"requests": 500}, {"requests": 7}, 1.0).requests_per_s == 7.0


def test_no_batch_in_the_interval_means_no_mean_batch() -> None:
    r = rates({"items": 5, "batches": 1}, {"items": 5, "batches": 1, "prep_cpu_us": 300}, 1.0)
    assert r.mean_batch is None and r.requests_per_s == 0.0
    assert r.prep_ms is None and r.model_ms is None  # CPU an item needs items in the interval
    older = rates({}, {"items": 10, "batches": 1}, 1.0)  # a worker from before the CPU counters
    assert older.mean_batch == 10.0 and older.prep_ms is None and older.model_ms is None
    assert rates({}, {"requests": 3}, 0.0).requests_per_s == 0.0


def _row(screen: str, first: str) -> list[str]:
    (line,) = [ln for ln in screen.splitlines() if ln.split()[:1] == [first]]
    return line.split()


def test_the_screen_shows_queues_workers_rates_and_batch_sizes() -> None:
    before = {"requests": 1000, "items": 990, "batches": 100, "prep_cpu_us": 1_000_000, "model_cpu_us": 2_000_000}
    after = {"requests": 1400, "items": 1390, "batches": 110, "prep_cpu_us": 1_500_000, "model_cpu_us": 2_960_000}
    prev, cur = snap(10.0, before, before), snap(12.0, after, after)
    screen = render(prev, cur, title="redbatch top · redis://h:6379/0 · prefix redbatch")
    assert screen.startswith("redbatch top · redis://h:6379/0 · prefix redbatch · ")
    assert "every 2.0 s" in screen
    assert "models: 1 · live workers: 1 · queued: 15 · in flight: 16 · replies unread: 2" in screen
    header = _row(screen, "MODEL")
    assert header[:5] == ["MODEL", "WORKERS", "QUEUE", "IN-FLIGHT", "REQ/S"]
    # model, workers, queue "15 (h3)", in-flight, req/s, items/s, batch/s, mean batch, err/s, exp/s
    model_row = ["resnet18", "1", "15", "(h3)", "16", "200.0", "200.0", "5.0", "40.0", "0.0", "0.0"]
    assert _row(screen, "resnet18") == model_row
    # worker, model, device, dtype, batch, lanes (none registered: 1), in-flight, req/s, mean batch,
    # CPU ms an item preparing inputs (500 ms over 400 items) and in the model (960 ms), heartbeat age, host:pid
    worker_row = ["w-a", "resnet18", "cuda:0", "float16", "32", "1", "16", "200.0", "40.0", "1.25", "2.40", "0.4s"]
    assert _row(screen, "w-a") == [*worker_row, "gpu1:4242"]


def test_columns_are_aligned() -> None:
    cur = snap(1.0, {}, {}, queues={"a-much-longer-model-name": 1, "m": 22}, stats={})
    lines = render(None, cur).splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("MODEL"))
    header, long, short = lines[at : at + 3]
    assert long.startswith("a-much-longer-model-name  ") and short.startswith("m" + " " * 25)
    end = header.index("QUEUE") + len("QUEUE")  # numbers are right-aligned under their heading
    assert long[end - 1 : end + 1] == "1 " and short[end - 2 : end + 1] == "22 "


def test_without_a_previous_snapshot_rates_are_dashes() -> None:
    cur = snap(1.0, {"requests": 10, "items": 10, "batches": 1}, {"requests": 10})
    screen = render(None, cur)
    assert "rates need two refreshes" in screen
    assert _row(screen, "resnet18")[5:] == ["-"] * 6
    assert _row(screen, "w-a")[7:11] == ["-"] * 4


def test_a_lowered_batch_cap_the_lanes_and_a_dead_workers_frames_show() -> None:
    w = worker("w-b", "resnet18", "cpu", {}, batch_cap="8", lanes="2")
    cur = snap(2.0, {}, {}, workers=[w], inflight={"w-b": 2, "w-dead": 5})
    screen = render(snap(1.0, {}, {}, workers=[w]), cur)
    assert _row(screen, "w-b")[4:6] == ["8/32", "2"]  # the lowered cap, two lanes
    assert _row(screen, "w-dead") == ["w-dead", "(dead)", "5"]
    assert _row(screen, "resnet18")[4] == "2"  # in flight at live workers of the model only


def test_models_only_known_from_their_queue_or_stats_are_listed() -> None:
    cur = snap(2.0, {}, {}, queues={"orphan": 4}, workers=[], inflight={}, stats={"old": {"requests": 9}})
    screen = render(None, cur)
    assert _row(screen, "orphan")[:3] == ["orphan", "0", "4"]
    assert _row(screen, "old")[:3] == ["old", "0", "0"]
    assert "no live workers" in screen


def test_an_empty_deployment_and_a_narrow_terminal() -> None:
    empty = Snapshot(at_s=0.0, wall_ms=0, queues={}, workers=[], inflight={}, stats={})
    screen = render(None, empty)
    assert "no models" in screen and "no live workers" in screen
    narrow = render(None, snap(1.0, {}, {}), width=30)
    assert max(len(ln) for ln in narrow.splitlines()) <= 30
