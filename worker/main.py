"""``redbatch worker``: load the model, register in Redis, serve until signalled."""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from torchvision.transforms.v2 import functional as F2

from common.config import Settings
from common.protocol import TensorData
from common.redisconn import connect
from worker.batching import bucket_sizes
from worker.graphs import use_cuda_graphs
from worker.handler import Handler, allow_compiled_shapes, prepare_inputs
from worker.instances import START_FAILED
from worker.metrics import serve as serve_metrics
from worker.registry import load_handler
from worker.runner import BLOCK_S, Worker, batch_buckets
from worker.threads import ThreadPlan, calibrate, choose_threads, medians

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def run(settings: Settings) -> int:
    """Serve until signalled; ``START_FAILED`` where the worker could not start (``--instances``
    starts no instance again after that)."""
    try:
        worker = start(settings)
    except SystemExit as exc:
        if not exc.code:
            raise
        print(exc.code, file=sys.stderr)
        return START_FAILED
    except Exception:
        logger.exception("the worker could not start")
        return START_FAILED
    return worker.run()


def start(settings: Settings) -> Worker:
    """Load and warm up the model, register signal handlers: a worker ready to ``run``."""
    if settings.max_batch_size < 1:
        raise SystemExit("--max-batch-size must be at least 1")
    if settings.preprocess not in ("auto", "api", "worker"):
        raise SystemExit("--preprocess must be auto, api or worker")
    if settings.batch_buckets not in ("auto", "on", "off"):
        raise SystemExit("--batch-buckets must be auto, on or off")
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    if (warning := emulated_dtype_warning(device, settings.dtype)) is not None:
        logger.warning(warning)
    if settings.cuda_graphs:
        check_cuda_graphs(device, settings.compile, settings.batch_buckets)
    try:
        handler = load_handler(settings, device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    buckets = batch_buckets(settings, device) or [1]
    if settings.compile:
        allow_compiled_shapes(len(buckets))  # one graph per bucket, all made during the warm-up below
    handler.setup(device)
    _warm_up(handler, buckets)
    if settings.cuda_graphs:
        use_cuda_graphs(handler, buckets, lambda n: blank_batch(handler, n))
        _warm_up(handler, buckets)  # every graph replayed once, before the worker is ready
    plan, image_s = _thread_plan(settings, handler, device)
    source = getattr(handler, "weights_source", "") or "its own"
    logger.info("loaded %s (%s weights) on %s as %r", settings.model, source, device, settings.served_name)
    ratio = image_s / _jpeg_prep_s(handler) if plan is not None else 0.0
    lanes = lane_count(settings, device, plan, ratio)
    if plan is not None:
        logger.info("%d lane(s): the forward pass costs %.1fx a JPEG's preprocessing per image", lanes, ratio)
    worker = Worker(settings, handler, device, connect(settings, BLOCK_S), plan, lanes)
    if settings.metrics_port:
        serve_metrics(settings, worker.id)
    worker.install_signal_handlers()
    return worker


# The forward pass must cost at least this many times an image's preprocessing per image (one
# thread each), i.e. be at least two thirds of an image's CPU, for a second lane to pay. Measured
# on 2 cores (docs/benchmarks.md): resnet18 in bfloat16 on AMX reads 4.9-5.9 and serves 38 % more with
# two lanes (its passes spread badly over two threads: 65.5 ms for 8 images on one, 49.0 on two);
# float32 reads 15-27 (+6 %); mobilenet_v3_small reads 1.3-1.9 on an AVX-512 EPYC and loses 3-5 %
# (its preprocessing keeps the other core busy), but 1.9-2.4 on an AVX2 EPYC, where one lane's
# one-thread passes were the bound with 6 % of the two cores idle, and two lanes served 5 % more; at
# --max-batch-size 1 it reads 3.8-4.4 and two lanes serve the same.
LANE_FORWARD_RATIO = 2.0


def lane_count(settings: Settings, device: torch.device, plan: ThreadPlan | None, forward_ratio: float) -> int:
    """How many forward passes may run at once (``--lanes``; ``worker/runner.py`` says how).

    ``auto`` (0): on a CPU with a thread plan, one lane per torch thread when ``forward_ratio`` (the
    forward pass's time per image over a JPEG's preprocessing, one thread each) is at least
    ``LANE_FORWARD_RATIO``: the model's passes then fill every core, and passes side by side on one
    thread each lose nothing at barriers (resnet18 here, ratio 15-27 in float32: +6 % served at 64
    clients; 5-6 in bfloat16 on AMX: +38 %; mobilenet_v3_small on an AVX2 CPU, 1.9-2.4: +5 %). A
    lighter model's preprocessing keeps a core busy (mobilenet_v3_small on an AVX-512 CPU, ratio
    1.3-1.9): a second lane only took CPU from it (-3 %), so one. One
    lane on CUDA (one stream orders the work anyway) and with ``--compile`` (compiled graphs are not
    run from several threads)."""
    if settings.lanes < 0:
        raise SystemExit("--lanes must be 0 (auto) or more")
    if device.type != "cpu" or settings.compile:
        if settings.lanes > 1:
            raise SystemExit("--lanes above 1 applies to a CPU worker without --compile")
        return 1
    if settings.lanes:
        return settings.lanes
    return torch.get_num_threads() if plan is not None and forward_ratio >= LANE_FORWARD_RATIO else 1


def emulated_dtype_warning(device: torch.device, dtype: str, native: Callable[[str], bool] | None = None) -> str | None:
    """What to tell a user who asked for a half-precision ``dtype`` on a CPU that has no instructions
    for it (oneDNN's own check, or ``native``): torch then emulates it, far slower than float32."""
    if device.type != "cpu" or dtype not in ("bfloat16", "float16"):
        return None
    if (native or _onednn_native)(dtype):
        return None
    return (
        f"--dtype {dtype} on a CPU without {dtype} instructions ({torch.backends.cpu.get_cpu_capability()}): "
        "torch emulates it, several times slower than float32 (resnet18 ran 6.8x slower on an AVX2 CPU, "
        "docs/benchmarks.md); float32 is the faster choice here"
    )


def _onednn_native(dtype: str) -> bool:
    probe = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True  # no way to tell: say nothing


def check_cuda_graphs(device: torch.device, compile_: bool, batch_buckets: str = "auto") -> None:
    """Exit with a clear message where ``--cuda-graphs`` cannot apply."""
    if device.type != "cuda":
        raise SystemExit(f"--cuda-graphs needs a CUDA device; this one is {device}")
    if batch_buckets == "off":
        raise SystemExit("--cuda-graphs needs --batch-buckets auto or on: one graph is captured per bucket")
    if compile_:
        raise SystemExit("--cuda-graphs with --compile is not supported: choose one")


def _warm_up(handler: Handler, sizes: list[int]) -> None:
    """A pass at every batch size the worker will run, so no request pays for lazy initialisation
    (and, on CUDA, for cuDNN choosing its plans)."""
    t0 = time.perf_counter()
    for n in sizes:
        _blank_pass(handler, n)
    logger.info("warmed up batch sizes %s in %.1fs", sizes, time.perf_counter() - t0)


def _blank_pass(handler: Handler, n: int) -> None:
    """What a batch of ``n`` costs the worker's main thread: preprocess, forward and postprocess."""
    with torch.inference_mode():
        handler.postprocess(handler.forward(blank_batch(handler, n)), [{"topk": 1}] * n)


def blank_batch(handler: Handler, n: int) -> torch.Tensor:
    """The model's input for ``n`` black model-sized images, made as serving makes it: prepared as
    the collector thread prepares them (normalised already, on a CPU), then ``preprocess``."""
    blank = TensorData("uint8", handler.spec.shape, bytes(handler.spec.crop_size**2 * 3))
    return handler.preprocess(prepare_inputs(handler, [blank] * n))


def _thread_plan(settings: Settings, handler: Handler, device: torch.device) -> tuple[ThreadPlan | None, float]:
    """On a CPU with several torch threads, time each batch size on one thread and on all of them,
    and keep the faster per size (``worker/threads.py``); None where that does not apply. Also the
    time per image of the largest batch on one thread (0.0 without a plan)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or not settings.adaptive_threads or threads < 2:
        return None, 0.0
    t0 = time.perf_counter()
    sizes = bucket_sizes(settings.max_batch_size)
    samples = calibrate(lambda n: _blank_pass(handler, n), torch.set_num_threads, sizes, (1, threads))
    torch.set_num_threads(threads)
    plan = ThreadPlan(choose_threads(samples))
    logger.info(
        "thread plan (batch size:threads) %s, from %s ms per pass (medians, as chosen) in %.1fs",
        plan.describe(),
        {s: {n: round(1000 * m, 1) for n, m in by.items()} for s, by in medians(samples).items()},
        time.perf_counter() - t0,
    )
    return plan, statistics.median(samples[sizes[-1]][1]) / sizes[-1]


def _jpeg_prep_s(handler: Handler) -> float:
    """One thread's time to decode a 640x480 JPEG and resize and crop it to the model's input, as
    the collector (or the API) does for every request: the yardstick of ``lane_count``."""
    y, x = torch.meshgrid(torch.arange(480), torch.arange(640), indexing="ij")
    image = torch.stack([x * 255 // 639, y * 255 // 479, (x * 7 + y * 3) % 256]).to(torch.uint8)
    jpeg = torchvision.io.encode_jpeg(image, quality=90)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        decoded = torchvision.io.decode_jpeg(jpeg)
        resized = F2.resize(decoded, [handler.spec.resize_size], antialias=True)
        F2.center_crop(resized, [handler.spec.crop_size])
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    elapsed = min(times[1:])  # the first pass allocates
    logger.info("a 640x480 JPEG's preprocessing takes %.2f ms on one thread here", 1000 * elapsed)
    return max(elapsed, 1e-6)
