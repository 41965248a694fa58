"""``redbatch top``: a live terminal view of a deployment, read from Redis alone (no HTTP, no torch).

Each refresh reads one ``Snapshot``: one SCAN of ``<prefix>:*`` finds the keys (queues, in-flight
lists, live worker hashes, per-model stats, unread replies), then one pipeline reads them all. The
screen is ``render(previous, current)``, a pure function: rates are the per-model and per-worker
counters differenced between the two snapshots, and the mean batch size is items / batches over
that interval (Triton's inference count / execution count).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import redis

from common.config import Settings, redact_url
from common.keys import Keys
from common.protocol import now_ms
from common.redisconn import connect
from common.registry import WorkerInfo, worker_from_hash

COUNTERS = ("requests", "items", "batches", "errors", "expired", "prep_cpu_us", "model_cpu_us")
PRIORITY_SUFFIXES = ("high", "low")  # Keys.queue(model, priority) for priorities other than normal
SCAN_COUNT = 1000
MODEL_COLUMNS = (
    "MODEL", "WORKERS", "QUEUE", "IN-FLIGHT", "REQ/S", "ITEMS/S", "BATCH/S", "MEAN BATCH", "ERR/S", "EXP/S"
)  # fmt: skip
WORKER_COLUMNS = (
    "WORKER", "MODEL", "DEVICE", "DTYPE", "MAX BATCH", "LANES", "IN-FLIGHT", "REQ/S", "MEAN BATCH", "PREP MS",
    "MODEL MS", "HEARTBEAT", "HOST:PID",
)  # fmt: skip
CLEAR = "\x1b[H\x1b[2J"
ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"


@dataclass(frozen=True)
class Snapshot:
    """What Redis showed at one moment."""

    at_s: float  # monotonic clock when read: rates are differences over it
    wall_ms: int  # wall clock when read: heartbeat ages and the time shown
    queues: dict[str, int]  # what follows "<prefix>:queue:" ("resnet18", "resnet18:high") -> frames waiting
    workers: list[WorkerInfo]  # live workers (their hash has not expired)
    inflight: dict[str, int]  # worker id -> frames taken and not yet answered (dead workers' too)
    stats: dict[str, dict[str, int]]  # model -> counters (requests, items, batches, errors, expired)
    replies: int = 0  # reply keys that nobody has read yet


@dataclass(frozen=True)
class Rates:
    """Counters differenced over an interval."""

    requests_per_s: float
    items_per_s: float
    batches_per_s: float
    errors_per_s: float
    expired_per_s: float
    mean_batch: float | None  # items per forward pass in the interval; None when none ran
    prep_ms: float | None  # CPU ms an item spent preparing its input (decode, resize); None without items
    model_ms: float | None  # CPU ms an item in the handler (preprocess, forward, postprocess; all its threads)


# ---- reading Redis ----------------------------------------------------------------------------


def read_snapshot(
    r: redis.Redis, keys: Keys, clock: Callable[[], float] = time.monotonic, wall: Callable[[], int] = now_ms
) -> Snapshot:
    """One SCAN to find the deployment's keys, one pipeline to read them."""
    found: dict[str, set[str]] = {kind: set() for kind in ("queue", "inflight", "worker", "stats", "reply")}
    head = keys.prefix + ":"
    for raw in r.scan_iter(match=_glob_escape(head) + "*", count=SCAN_COUNT):
        kind, sep, rest = _s(raw)[len(head) :].partition(":")
        if sep and rest and kind in found:
            found[kind].add(rest)
    queues, inflight, workers, models = (sorted(found[k]) for k in ("queue", "inflight", "worker", "stats"))
    pipe = r.pipeline(transaction=False)
    for q in queues:
        pipe.llen(keys.queue(q))  # q may carry a priority suffix: the key is the same
    for wid in inflight:
        pipe.llen(keys.inflight(wid))
    for wid in workers:
        pipe.hgetall(keys.worker(wid))
    for m in models:
        pipe.hgetall(keys.stats(m))
    replies = iter(pipe.execute(raise_on_error=False))  # a key of another type reads as empty
    at_s, wall_ms = clock(), wall()
    lengths = {q: _int(next(replies)) for q in queues}
    taken = {wid: _int(next(replies)) for wid in inflight}
    infos = [worker_from_hash(wid, _dict(next(replies))) for wid in workers]
    stats = {m: {_s(k): _int(v) for k, v in _dict(next(replies)).items()} for m in models}
    return Snapshot(
        at_s=at_s,
        wall_ms=wall_ms,
        queues={q: n for q, n in lengths.items() if n},
        workers=[w for w in infos if w is not None],
        inflight=taken,
        stats=stats,
        replies=len(found["reply"]),
    )


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _s(v: bytes | str) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _int(v: object) -> int:
    if isinstance(v, int):
        return v
    try:
        return int(v) if isinstance(v, bytes | str) else 0
    except ValueError:
        return 0


def _dict(v: object) -> dict[Any, Any]:
    return v if isinstance(v, dict) else {}


# ---- rates ------------------------------------------------------------------------------------


def rates(prev: Mapping[str, int], cur: Mapping[str, int], dt_s: float) -> Rates:
    """Per-second rates of ``COUNTERS`` from ``prev`` to ``cur``, ``dt_s`` apart.

    A counter absent from ``prev`` counts from 0 (its hash was created in the interval); one that
    went down was reset (its hash was deleted), so it counts from 0 again too.
    """
    d = {}
    for name in COUNTERS:
        now, before = cur.get(name, 0), prev.get(name, 0)
        d[name] = now - before if now >= before else now
    per_s = 1.0 / dt_s if dt_s > 0 else 0.0
    return Rates(
        requests_per_s=d["requests"] * per_s,
        items_per_s=d["items"] * per_s,
        batches_per_s=d["batches"] * per_s,
        errors_per_s=d["errors"] * per_s,
        expired_per_s=d["expired"] * per_s,
        mean_batch=d["items"] / d["batches"] if d["batches"] > 0 else None,
        prep_ms=_per_item_ms(d, cur, "prep_cpu_us"),
        model_ms=_per_item_ms(d, cur, "model_cpu_us"),
    )


def _per_item_ms(d: Mapping[str, int], cur: Mapping[str, int], counter: str) -> float | None:
    """CPU ms an item from a µs counter; None without items, or from a worker that does not count it."""
    return d[counter] / d["items"] / 1000 if d["items"] > 0 and counter in cur else None


def worker_counters(w: WorkerInfo) -> dict[str, int]:
    return {name: _int(w.fields[name]) for name in COUNTERS if name in w.fields}


# ---- rendering --------------------------------------------------------------------------------


def render(prev: Snapshot | None, cur: Snapshot, title: str = "redbatch top", width: int | None = None) -> str:
    """The screen for ``cur``; rates need ``prev`` (an earlier snapshot), and show ``-`` without it.

    Pure: the same two snapshots always give the same text. Lines are cut at ``width`` when given.
    """
    dt_s = cur.at_s - prev.at_s if prev is not None else 0.0
    live = {w.id for w in cur.workers}
    models = sorted({_model_of(q) for q in cur.queues} | set(cur.stats) | {w.model for w in cur.workers})
    clock = datetime.datetime.fromtimestamp(cur.wall_ms / 1000).strftime("%H:%M:%S")
    every = f" · every {dt_s:.1f} s" if prev is not None else " · rates need two refreshes"
    queued, taken = sum(cur.queues.values()), sum(cur.inflight.values())
    lines = [
        f"{title} · {clock}{every}",
        f"models: {len(models)} · live workers: {len(live)} · queued: {queued} · in flight: {taken} · "
        f"replies unread: {cur.replies}",
        "",
        *_model_table(prev, cur, models, dt_s),
        "",
        *_worker_table(prev, cur, dt_s),
    ]
    if width is not None:
        lines = [line[:width] for line in lines]
    return "\n".join(lines) + "\n"


def _model_table(prev: Snapshot | None, cur: Snapshot, models: list[str], dt_s: float) -> list[str]:
    rows = []
    for m in models:
        served_by = [w.id for w in cur.workers if w.model == m]
        rate = rates(prev.stats.get(m, {}), cur.stats.get(m, {}), dt_s) if prev is not None else None
        rows.append(
            [
                m,
                str(len(served_by)),
                _queue_cell(cur.queues, m),
                str(sum(cur.inflight.get(wid, 0) for wid in served_by)),
                *_rate_cells(rate),
            ]
        )
    if not rows:
        return ["no models: no worker has registered, no queue holds frames"]
    return _table(MODEL_COLUMNS, rows, left={0})


def _worker_table(prev: Snapshot | None, cur: Snapshot, dt_s: float) -> list[str]:
    before = {w.id: worker_counters(w) for w in prev.workers} if prev is not None else {}
    rows = []
    for w in sorted(cur.workers, key=lambda w: (w.model, w.id)):
        rate = rates(before.get(w.id, {}), worker_counters(w), dt_s) if prev is not None else None
        cap = _int(w.fields.get("batch_cap", w.max_batch_size))
        beat_ms = cur.wall_ms - _int(w.fields.get("heartbeat_ms")) if "heartbeat_ms" in w.fields else None
        rows.append(
            [
                w.id,
                w.model,
                w.device,
                w.fields.get("dtype", ""),
                f"{cap}/{w.max_batch_size}" if cap != w.max_batch_size else str(w.max_batch_size),
                str(w.fields.get("lanes", "1")),  # forward passes that may run at once (worker/runner.py)
                str(cur.inflight.get(w.id, 0)),
                "-" if rate is None else f"{rate.requests_per_s:.1f}",
                _num(None if rate is None else rate.mean_batch, 1),
                _num(None if rate is None else rate.prep_ms, 2),
                _num(None if rate is None else rate.model_ms, 2),
                "-" if beat_ms is None else f"{max(beat_ms, 0) / 1000:.1f}s",
                f"{w.fields.get('host', '?')}:{w.fields.get('pid', '?')}",
            ]
        )
    live = {w.id for w in cur.workers}
    for wid, n in sorted(cur.inflight.items()):
        if wid not in live and n:  # its frames go back to the queue at a live worker's next heartbeat
            rows.append([wid, "(dead)", "", "", "", "", str(n), "", "", "", "", "", ""])
    return _table(WORKER_COLUMNS, rows, left={0, 1, 2, 3, 12}) if rows else ["no live workers"]


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _model_of(queue: str) -> str:
    model, sep, suffix = queue.rpartition(":")
    return model if sep and suffix in PRIORITY_SUFFIXES else queue


def _queue_cell(queues: Mapping[str, int], model: str) -> str:
    normal = queues.get(model, 0)
    extra = {p: queues.get(f"{model}:{p}", 0) for p in PRIORITY_SUFFIXES}
    total = normal + sum(extra.values())
    if not any(extra.values()):
        return str(total)
    return f"{total} (" + " ".join(f"{p[0]}{n}" for p, n in extra.items() if n) + ")"


def _rate_cells(rate: Rates | None) -> list[str]:
    if rate is None:
        return ["-"] * 6
    mean = "-" if rate.mean_batch is None else f"{rate.mean_batch:.1f}"
    return [
        f"{rate.requests_per_s:.1f}",
        f"{rate.items_per_s:.1f}",
        f"{rate.batches_per_s:.1f}",
        mean,
        f"{rate.errors_per_s:.1f}",
        f"{rate.expired_per_s:.1f}",
    ]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Collection[int]) -> list[str]:
    """Columns padded to their widest cell: those in ``left`` (names) left-aligned, the others
    (numbers) right-aligned."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return [line(headers), *(line(r) for r in rows)]


# ---- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval-s", type=float, default=1.0, help="seconds between refreshes (default 1)")
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one screen and exit, without clearing: two reads --interval-s apart, so that it shows rates "
        "(--interval-s 0: one read, no rates)",
    )


def run(settings: Settings, interval_s: float, once: bool, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    r = connect(settings, longest_block_s=0.0)
    keys = settings.keys
    title = f"redbatch top · {redact_url(settings.redis_url)} · prefix {settings.prefix}"
    if once:
        try:
            first = read_snapshot(r, keys)
            prev, cur = (None, first) if interval_s <= 0 else (first, _read_after(r, keys, interval_s))
        except redis.RedisError as exc:
            print(f"redbatch top: Redis at {redact_url(settings.redis_url)} does not answer: {exc}", file=sys.stderr)
            return 1
        out.write(render(prev, cur, title))
        return 0
    return _live(r, keys, title, max(interval_s, 0.1), out)


def _read_after(r: redis.Redis, keys: Keys, interval_s: float) -> Snapshot:
    time.sleep(interval_s)
    return read_snapshot(r, keys)


def _live(r: redis.Redis, keys: Keys, title: str, interval_s: float, out: TextIO) -> int:
    """Refresh until Ctrl-C; a terminal gets its own screen (restored on exit), a pipe a stream."""
    tty = out.isatty()
    prev: Snapshot | None = None
    if tty:
        out.write(ALT_SCREEN_ON)
    try:
        while True:
            width = shutil.get_terminal_size().columns if tty else None
            try:
                cur = read_snapshot(r, keys)
            except redis.RedisError as exc:
                screen, prev = f"{title}\n\nRedis does not answer: {exc}\n", None
            else:
                screen, prev = render(prev, cur, title, width), cur
            out.write((CLEAR if tty else "\n") + screen)
            out.flush()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            out.write(ALT_SCREEN_OFF)
            out.flush()
