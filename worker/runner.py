"""The worker: a collector thread fills a bounded local buffer from Redis while the main thread
forms batches from it, runs one forward pass per batch and replies.

Collecting batch k+1 thus overlaps the forward pass of batch k, and a batch window measured from
the first item's arrival means items that queued while the model was busy go without waiting.

On a CPU the worker may run several *lanes*: threads that take turns forming batches and run
them, so that two forward passes can run at once, each on one torch thread. Under load that keeps
every core in the model's work with no thread of one pass waiting at another's barriers (the
machine limit's "one thread per core"). A pass that finds no other lane in its forward pass runs
on the thread plan's count, so a lone request still gets every core. While another lane is in a
pass, a lane starts one only with a full batch: splitting the arrivals between lanes cut
mobilenet_v3_small's batches from 25 to 5 (``worker/main.py`` chooses how many lanes).

Only the first lane (the main thread) forms a batch while no pass runs, and only it runs passes on
more than one thread; the other lanes run one-thread passes beside it. OpenMP gives every thread
that starts a parallel region a team of its own, and libgomp counts their threads: with more than
the CPUs, its threads stop spinning between the regions of a pass and sleep at once, and each of a
pass's hundreds of regions then pays a wake-up (resnet18's lone pass: 22 ms against 17).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import redis
import torch

from common.config import Settings
from common.errors import (
    DeadlineExceeded,
    FrameError,
    InferenceFailed,
    InvalidImage,
    ModelNotFound,
    RedbatchError,
)
from common.protocol import Reply, Request, decode_request, now_ms
from worker.batching import LocalBuffer, bucket_for, bucket_sizes, collect_batch, effective_window
from worker.broker import Outgoing, WorkerBroker
from worker.handler import MAX_TOPK, Handler, prepare_inputs
from worker.metrics import WorkerMetrics
from worker.threads import ThreadPlan

logger = logging.getLogger(__name__)

BLOCK_S = 1.0  # longest a Redis pop blocks: bounds how late the worker notices a stop
IDLE_S = 0.5
RESCAN_EVERY_BEATS = 30  # the registry set finds dead peers; a keyspace SCAN now and then finds orphans


@dataclass
class _Item:
    raw: bytes
    req: Request
    x: Any  # what the handler's ``preprocess`` takes for this request (``prepare``'s output, or the input)
    taken: float = 0.0  # perf_counter when the collector's take returned it
    ready: float = 0.0  # perf_counter when its input was prepared, into the buffer


class Worker:
    def __init__(
        self,
        settings: Settings,
        handler: Handler,
        device: torch.device,
        r: redis.Redis,
        thread_plan: ThreadPlan | None = None,
        lanes: int = 1,
    ) -> None:
        self.settings = settings
        self.thread_plan = thread_plan
        self._threads = torch.get_num_threads()  # the main thread's: other threads see their own
        self.lanes = max(lanes, 1)
        self._busy_lanes = 0  # lanes in a forward pass
        # Work behind the batch being formed (``_use_threads``): frames the collector has taken from
        # Redis and not yet put into the buffer; ``broker.left``: frames still queued after its take.
        self._admitting = 0
        # Frames the collector has taken from Redis (a running count), and whether any came in
        # during the last pass: then the collector is busy beside the passes, and a second torch
        # thread would contend with it (``_use_threads``).
        self._taken = 0
        self._taken_in_pass = False
        self._batched = bool(getattr(handler, "prepares_batches", False))  # prepare whole takes at once
        self._lanes_lock = threading.Lock()
        self._lanes_changed = threading.Condition(self._lanes_lock)  # a pass started or ended
        self._forming = threading.Lock()  # one lane forms a batch at a time
        self.handler = handler
        self.device = device
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.broker = WorkerBroker(r, settings, self.id)
        # Up to one batch ahead of the forward passes: the next one fills while the lanes run.
        capacity = (self.lanes + 1) * settings.max_batch_size
        self.buffer: LocalBuffer[_Item] = LocalBuffer(capacity)
        stage = getattr(handler, "stage", None)  # optional: ImageHandler's ring of host rows (CPU only)
        if stage is not None:
            # every image the worker can hold at once (the buffer's capacity, plus a batch in each
            # lane's pass) and a batch more: twice the capacity
            stage(2 * capacity)
        self._outbox: queue.Queue[tuple[list[Outgoing], Counter[str]] | None] = queue.Queue(maxsize=4)
        self.batch_cap = settings.max_batch_size  # lowered after an out-of-memory error
        self.buckets = batch_buckets(settings, device)
        self._unsent: Counter[str] = Counter()
        self._unsent_lock = threading.Lock()
        self.stop = threading.Event()
        self.started_ms = now_ms()
        self.batches = 0
        self.metrics = WorkerMetrics(settings.served_name)

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or ``self.stop``); finish and answer what was taken; return 0."""
        self._retry_redis(self.broker.register, self._fields())
        self._retry_redis(self.broker.recover_dead, True)
        self.metrics.up.set(1)
        threads = [
            threading.Thread(target=self._collect_loop, name="collector", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
            threading.Thread(target=self._reply_loop, name="replier", daemon=True),
        ]
        for t in threads:
            t.start()
        logger.info(
            "worker %s serving %s on %s (max batch %d, window %.1f ms, %d lane%s)",
            self.id,
            self.settings.served_name,
            self.device,
            self.settings.max_batch_size,
            self.settings.window_ms,
            self.lanes,
            "s" if self.lanes > 1 else "",
        )
        lanes = [
            threading.Thread(target=self._lane_loop, args=(i,), name=f"lane-{i}", daemon=True)
            for i in range(1, self.lanes)
        ]
        for t in lanes:
            t.start()
        self._lane_loop()  # this thread is lane 0 (and receives the signals)
        for t in lanes:
            t.join()  # each finishes the batch it holds
        self.metrics.up.set(0)
        threads[0].join()  # the collector takes nothing more once stop is set
        self.buffer.close()
        while leftover := [a.item for a in self.buffer.take(self.batch_cap, 0)]:
            self.process(leftover, alone=True)
        self._outbox.put(None)
        threads[2].join()  # every reply is out before we unregister
        self._retry_redis(self.broker.unregister, attempts=3)
        logger.info("worker %s stopped after %d batches", self.id, self.batches)
        return 0

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if self.stop.is_set():
                logger.warning("second signal: exiting at once")
                os._exit(1)
            logger.info("signal %d: finishing the current batch, then exiting", signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # ---- threads ---------------------------------------------------------------------------

    def _lane_loop(self, lane: int = 0) -> None:
        if lane and self.device.type == "cpu":
            torch.set_num_threads(1)  # for good: this thread never starts an OpenMP team (module docstring)
        while not self.stop.is_set():
            self._lane_step(lane)

    def _lane_step(self, lane: int = 0) -> None:
        """Form one batch and run it. Its items die when this returns, not when the next batch is
        formed: the handler's staging ring reuses an image's row once nothing refers to it. A lane
        but the first waits for another lane's pass before it forms one (``_next_batch``)."""
        if lane:
            with self._lanes_changed:
                if not self._lanes_changed.wait_for(lambda: self._busy_lanes > 0, IDLE_S):
                    return
        with self._forming:
            items = self._next_batch(lane)
            if not items:
                return
            with self._lanes_changed:
                alone = self._busy_lanes == 0
                self._busy_lanes += 1
                self._lanes_changed.notify_all()
            backlog = len(self.buffer) > 0 or self._admitting > 0 or self.broker.left > 0 or self._taken_in_pass
        taken = ended = self._taken
        try:
            ended = self.process(items, alone, backlog, lane)
        finally:
            self._taken_in_pass = ended != taken
            with self._lanes_changed:
                self._busy_lanes -= 1
            self.buffer.notify()  # a lane waiting for a full batch may go on as usual now

    def _next_batch(self, lane: int = 0) -> list[_Item]:
        """The batching policy (``worker/batching.py``) while no other lane is in a pass; while one
        is, a full batch or nothing (``[]`` after ``IDLE_S``, or at once when that lane finishes).
        A lane but the first takes only full batches: the batch that runs alone is the first's."""
        if self._busy_lanes or lane:
            if not self.buffer.wait_for(self.batch_cap, lambda: not self._busy_lanes, IDLE_S):
                return []
            if self._busy_lanes or lane:
                return [a.item for a in self.buffer.take(self.batch_cap, 0)]
        window = effective_window(self.settings.window_ms / 1000.0, self.buffer.mean_gap_s)
        return collect_batch(self.buffer, self.batch_cap, window, time.monotonic, IDLE_S)

    def _collect_loop(self) -> None:
        if self.device.type == "cpu":
            # This thread decodes one image at a time beside the forward pass: an OpenMP team of
            # its own would only add wake-ups (set per thread: the main thread keeps its count).
            torch.set_num_threads(1)
        backoff = 0.1
        while not self.stop.is_set():
            room = self.buffer.wait_for_room(IDLE_S)
            if room == 0:
                continue
            try:
                raws = self.broker.take(min(room, self.settings.max_batch_size), BLOCK_S)
                backoff = 0.1
            except redis.RedisError as exc:
                logger.warning("collector: Redis error (%s); retrying in %.1fs", exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if raws:
                self._taken += len(raws)
                self._admit_all(raws, time.perf_counter())

    def _admit_all(self, raws: list[bytes], taken: float) -> None:
        """Decode, check and prepare frames as they are popped, each into the buffer as soon as it
        is ready (this thread's decoding overlaps the forward pass), or all of them with one call
        of a handler that ``prepares_batches``; answer the ones that cannot run."""
        counts: Counter[str] = Counter(requests=len(raws))
        rejected: list[Outgoing] = []
        self._admitting = len(raws)
        try:
            if self._batched:
                checked = [self._check(raw, counts) for raw in raws]
                rejected = [c for c in checked if isinstance(c, Outgoing)]
                items = self._prepare_together([c for c in checked if isinstance(c, _Item)], counts, rejected)
                ready = time.perf_counter()
                for it in items:
                    it.taken, it.ready = taken, ready
                self._admitting = 0  # first: a lane woken by the put must not count them twice
                if items:
                    self.buffer.put(items)
            else:
                for raw in raws:
                    got = self._admit(raw, counts)
                    self._admitting -= 1  # first: a lane woken by the put must not count it twice
                    if isinstance(got, _Item):
                        got.taken, got.ready = taken, time.perf_counter()
                        self.buffer.put([got])
                    else:
                        rejected.append(got)
        finally:
            self._admitting = 0
        self._send(rejected, counts)

    def _prepare_together(self, items: list[_Item], counts: Counter[str], rejected: list[Outgoing]) -> list[_Item]:
        """``items`` with their inputs prepared in one call; if it fails, one by one, so that only
        the inputs at fault are answered with an error (into ``rejected``)."""
        if not items:
            return []
        try:
            xs = self._prepare([it.x for it in items], counts)
        except Exception:
            xs = []
        if len(xs) == len(items):
            for it, x in zip(items, xs):
                it.x = x
            return items
        ok = []
        for it in items:
            got = self._prepared(it, counts)
            if isinstance(got, _Item):
                ok.append(got)
            else:
                rejected.append(got)
        return ok

    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self.stop.wait(self.settings.heartbeat_s):
            beats += 1
            try:
                self.broker.register(self._fields())
                self.broker.recover_dead(scan=beats % RESCAN_EVERY_BEATS == 0)
            except redis.RedisError as exc:
                logger.warning("heartbeat: Redis error (%s)", exc)

    def _fields(self) -> dict[str, str | int]:
        return {
            "model": self.settings.served_name,
            "arch": self.settings.model,
            "device": str(self.device),
            "dtype": self.settings.dtype,
            "max_batch_size": self.settings.max_batch_size,
            "batch_cap": self.batch_cap,
            "buckets": ",".join(map(str, self.buckets)),
            "cuda_graphs": int(self.settings.cuda_graphs),
            "window_ms": str(self.settings.window_ms),
            "threads": self.thread_plan.describe() if self.thread_plan else str(self._threads),
            "lanes": self.lanes,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_ms": self.started_ms,
            "heartbeat_ms": now_ms(),
            "spec": json.dumps(self.handler.spec.to_dict()),
        }

    # ---- one batch -------------------------------------------------------------------------

    def process(self, items: list[_Item], alone: bool = True, backlog: bool = False, lane: int = 0) -> int:
        """Drop what expired while buffered, run the rest as one forward pass, reply to every item.
        ``alone``: no other lane was in a forward pass when this batch was formed; ``backlog``: more
        items were waiting behind it (in the buffer, being prepared by the collector, or queued in
        Redis at the collector's last take), or came in during the last pass; ``lane``: the lane
        running it (``_use_threads``). Returns the collector's count of frames taken (``_taken``)
        as the pass ended, before its replies went out: a client's next request, sent once it has
        its answer, may be taken while this thread still waits for Redis to acknowledge the replies,
        and did not come in during the pass."""
        counts: Counter[str] = Counter()
        out: list[Outgoing] = []
        live: list[_Item] = []
        at_ms = now_ms()
        for it in items:
            if it.req.expired(at_ms):
                counts["expired"] += 1
                logger.warning("request %s expired before its forward pass; skipped", it.req.id)
                err = DeadlineExceeded("deadline passed before the request reached the model")
                out.append(Outgoing(it.raw, Reply.failure(it.req.id, err)))
            else:
                live.append(it)
        if live:
            self._use_threads(len(live), alone, backlog, lane)
            out.extend(self._run(live, counts))
            counts["batches"] += 1
            with self._lanes_lock:
                self.batches += 1
        ended = self._taken
        self._send(out, counts, direct_if_idle=True)
        return ended

    def _admit(self, raw: bytes, counts: Counter[str]) -> _Item | Outgoing:
        got = self._check(raw, counts)
        return self._prepared(got, counts) if isinstance(got, _Item) else got

    def _check(self, raw: bytes, counts: Counter[str]) -> _Item | Outgoing:
        """The frame decoded and checked, as an item whose input is still unprepared, or the
        answer to a frame that cannot run."""
        try:
            req = decode_request(raw)
        except FrameError as exc:
            counts["errors"] += 1
            logger.warning("dropping a bad frame: %s", exc.message)
            reply = Reply.failure(exc.request_id, exc) if exc.request_id else None
            return Outgoing(raw, reply)
        err: RedbatchError | None = None
        if req.expired():
            counts["expired"] += 1
            err = DeadlineExceeded("deadline passed before the request reached the model")
            logger.warning("request %s expired in the queue; skipped", req.id)
        elif req.model != self.settings.served_name:
            err = ModelNotFound(f"this worker serves {self.settings.served_name!r}, not {req.model!r}")
        elif (why := self.handler.check_input(req.input)) is not None:
            err = InvalidImage(why)
        elif not _valid_topk(req.params.get("topk", 5)):
            err = InvalidImage(f"topk must be an integer from 1 to {MAX_TOPK}")
        if err is None:
            return _Item(raw, req, req.input)
        if not isinstance(err, DeadlineExceeded):
            counts["errors"] += 1
        return Outgoing(raw, Reply.failure(req.id, err))

    def _prepared(self, it: _Item, counts: Counter[str]) -> _Item | Outgoing:
        """``it`` with its input prepared alone, or the error answer for an input that will not go."""
        try:
            it.x = self._prepare([it.x], counts)[0]
            return it
        except RedbatchError as exc:
            err = exc
        except Exception:
            logger.exception("request %s: the handler could not prepare its input", it.req.id)
            err = InvalidImage("the input could not be prepared for the model")
        counts["errors"] += 1
        return Outgoing(it.raw, Reply.failure(it.req.id, err))

    def _prepare(self, xs: list[Any], counts: Counter[str]) -> list[Any]:
        """The handler's ``prepare`` of ``xs`` (decoding, resizing), its CPU time counted."""
        c0 = time.thread_time()
        try:
            return prepare_inputs(self.handler, xs)
        finally:
            counts["prep_cpu_us"] += round((time.thread_time() - c0) * 1e6)

    def _use_threads(self, size: int, alone: bool, backlog: bool, lane: int = 0) -> None:
        """Set this lane's torch threads for a pass over ``size`` items (the count is per thread):
        one on any lane but the first (module docstring), and while another lane is in a pass (it
        holds the other core); with a thread plan, one while more items wait behind the batch or
        came in during the last pass (the collector is preparing them on the other core, where a
        second torch thread would only contend with it, and with OpenMP's short spin take the core
        it waits on: at 64 clients mobilenet_v3_small's batches of 17-32 cost 0.3 ms of CPU an
        image more on the plan's two threads, and served 6-8 % less), else the plan's count, the
        fastest for a pass alone; without a plan, all threads when there are several lanes."""
        if self.lanes > 1 and (lane or not alone):
            n = 1
        elif self.thread_plan is not None:
            n = 1 if backlog else self.thread_plan.for_batch(size)
        elif self.lanes > 1:
            n = self._threads
        else:
            return
        if n != torch.get_num_threads():
            torch.set_num_threads(n)

    def _run(self, items: list[_Item], counts: Counter[str]) -> list[Outgoing]:
        """One forward pass; if it raises, split the batch in halves so only the culprit fails."""
        start_ms = now_ms()
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            with torch.inference_mode():
                x = self.handler.preprocess([it.x for it in items])
                out = self.handler.forward(pad_batch(x, self.buckets))[: len(items)]
                results = self.handler.postprocess(out, [it.req.params for it in items])
            if len(results) != len(items):
                raise RuntimeError(f"handler returned {len(results)} results for {len(items)} inputs")
        except Exception as exc:
            if _is_oom(exc):
                self._lower_cap(len(items))
            if len(items) == 1:
                counts["errors"] += 1
                if isinstance(exc, RedbatchError):  # the input's fault, e.g. a JPEG that does not decode
                    logger.warning("request %s failed: %s", items[0].req.id, exc.message)
                    return [Outgoing(items[0].raw, Reply.failure(items[0].req.id, exc))]
                logger.exception("inference failed for request %s", items[0].req.id)
                err = InferenceFailed("the model failed on this input")
                return [Outgoing(items[0].raw, Reply.failure(items[0].req.id, err))]
            if isinstance(exc, RedbatchError):
                logger.warning("batch of %d failed (%s); retrying in halves", len(items), exc.message)
            else:
                logger.exception("batch of %d failed; retrying in halves", len(items))
            mid = len(items) // 2
            return self._run(items[:mid], counts) + self._run(items[mid:], counts)
        infer_ms = (time.perf_counter() - t0) * 1000.0
        threads = torch.get_num_threads()
        # The CPU the pass held: its thread's own, or on several threads all of them for its
        # length (OpenMP's threads work or spin through a pass; their time is not this thread's).
        cpu_s = time.thread_time() - c0 if threads == 1 or self.device.type != "cpu" else infer_ms / 1000.0 * threads
        counts["items"] += len(items)
        counts["model_cpu_us"] += round(cpu_s * 1e6)
        self.metrics.batch(len(items), infer_ms / 1000.0, (start_ms - it.req.sent_ms for it in items if it.req.sent_ms))
        logger.debug("batch of %d in %.1f ms", len(items), infer_ms)
        return [
            Outgoing(
                it.raw,
                Reply(
                    id=it.req.id,
                    ok=True,
                    result=res,
                    meta={
                        "worker": self.id,
                        "batch_size": len(items),
                        "queue_ms": max(start_ms - it.req.sent_ms, 0) if it.req.sent_ms else 0,
                        "infer_ms": round(infer_ms, 3),
                        **_held(it, t0),
                    },
                ),
            )
            for it, res in zip(items, results)
        ]

    def _lower_cap(self, failed_size: int) -> None:
        new_cap = max(1, min(self.batch_cap, failed_size) // 2)
        if new_cap < self.batch_cap:
            logger.warning("out of device memory at batch %d: batch cap lowered to %d", failed_size, new_cap)
            self.batch_cap = new_cap
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _send(self, out: list[Outgoing], counts: Counter[str], direct_if_idle: bool = False) -> None:
        """Hand replies to the replier thread, so that they go out while the next batch runs.
        The queue is short: if Redis falls behind, the forward pass waits rather than piling up.
        With no next batch waiting and the replier idle, reply on this thread instead: a lone
        request then skips a thread hop (a wake-up, which on a VM costs up to a millisecond)."""
        self.metrics.count(counts)
        if not out:  # nothing to send: the counts ride on the next reply (no thread woken for them)
            with self._unsent_lock:
                self._unsent.update(counts)
            return
        # On CUDA a take the collector is still preparing is the next batch: the lane stays free for it.
        next_batch = bool(self.buffer) or (self._batched and self._admitting > 0)
        if direct_if_idle and not next_batch and self._outbox.empty():
            self._send_now(out, counts)
        else:
            self._outbox.put((out, counts))

    def _reply_loop(self) -> None:
        while (job := self._outbox.get()) is not None:
            self._send_now(*job)

    def _send_now(self, out: list[Outgoing], counts: Counter[str]) -> None:
        """Reply to ``out`` and add ``counts``, with any that waited for a reply to ride on, to the stats."""
        with self._unsent_lock:
            counts = counts + self._unsent
            self._unsent.clear()
        # Replies outlive a short Redis outage: retry for up to one request timeout.
        backoff = 0.05
        give_up_ms = now_ms() + int(self.settings.request_timeout_s * 1000)
        while True:
            try:
                self.broker.send(out, counts)
                return
            except redis.RedisError as exc:
                if now_ms() > give_up_ms:
                    logger.error("could not reply to %d requests (%s); they stay in flight", len(out), exc)
                    return
                logger.warning("reply failed (%s); retrying in %.2fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _retry_redis(self, fn: Callable[..., Any], *args: Any, attempts: int = 0) -> Any:
        """Call ``fn`` until Redis answers (``attempts`` 0: until stopped), with backoff."""
        backoff, n = 0.2, 0
        while True:
            try:
                return fn(*args)
            except redis.RedisError as exc:
                n += 1
                if (attempts and n >= attempts) or self.stop.is_set():
                    logger.warning("giving up on %s: %s", getattr(fn, "__name__", fn), exc)
                    return None
                logger.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)


def batch_buckets(settings: Settings, device: torch.device) -> list[int]:
    """Batch sizes that forward passes are padded up to ([] means no padding).

    On CUDA every new batch shape costs cuDNN a new execution plan (milliseconds of CPU each), and
    batches of every size from 1 to N keep producing new shapes: padding to a few buckets, all
    warmed up at start, bounds them; with ``--compile`` every new shape would cost a compilation.
    On a CPU the padding is paid in full compute, so ``auto`` pads there only with ``--compile``.
    """
    mode = settings.batch_buckets
    if mode == "off" or (mode == "auto" and device.type != "cuda" and not settings.compile):
        return []
    return bucket_sizes(settings.max_batch_size)


def pad_batch(x: torch.Tensor, buckets: list[int]) -> torch.Tensor:
    """``x`` padded with copies of its last item up to the next bucket, in ``x``'s memory format."""
    n = x.shape[0]
    size = bucket_for(n, buckets)
    if size == n:
        return x
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else None
    padded = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
    return padded.contiguous(memory_format=fmt) if fmt is not None else padded


def _held(it: _Item, start: float) -> dict[str, float]:
    """Where the worker held ``it`` before its pass (``start``), in ms (the API's ``Server-Timing``):
    preparing its input (from the take), then waiting for its batch and a lane. Nothing for an item
    with no take time (not from the collector)."""
    if not it.taken:
        return {}
    return {"prep_ms": round((it.ready - it.taken) * 1000.0, 3), "wait_ms": round((start - it.ready) * 1000.0, 3)}


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom)


def _valid_topk(k: Any) -> bool:
    return isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_TOPK
