"""``redbatch worker``: load the model, register in Redis, serve until signalled."""

from __future__ import annotations

import logging
import time

import torch

from common.config import Settings
from common.redisconn import connect
from worker.handler import Handler
from worker.metrics import serve as serve_metrics
from worker.registry import load_handler
from worker.runner import BLOCK_S, Worker, batch_buckets

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def run(settings: Settings) -> int:
    if settings.max_batch_size < 1:
        raise SystemExit("--max-batch-size must be at least 1")
    if settings.preprocess not in ("auto", "api", "worker"):
        raise SystemExit("--preprocess must be auto, api or worker")
    if settings.batch_buckets not in ("auto", "on", "off"):
        raise SystemExit("--batch-buckets must be auto, on or off")
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    try:
        handler = load_handler(settings, device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    buckets = batch_buckets(settings, device) or [1]
    if settings.compile:
        import torch._dynamo as dynamo

        # one compiled graph per bucket, all made during the warm-up below
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, len(buckets) + 2)
    handler.setup(device)
    _warm_up(handler, buckets)
    source = getattr(handler, "weights_source", "") or "its own"
    logger.info("loaded %s (%s weights) on %s as %r", settings.model, source, device, settings.served_name)
    worker = Worker(settings, handler, device, connect(settings, BLOCK_S))
    if settings.metrics_port:
        serve_metrics(settings, worker.id)
    worker.install_signal_handlers()
    return worker.run()


def _warm_up(handler: Handler, sizes: list[int]) -> None:
    """A pass at every batch size the worker will run, so no request pays for lazy initialisation
    (and, on CUDA, for cuDNN choosing its plans)."""
    from common.protocol import TensorData

    blank = TensorData("uint8", handler.spec.shape, bytes(handler.spec.crop_size**2 * 3))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for n in sizes:
            handler.postprocess(handler.forward(handler.preprocess([blank] * n)), [{"topk": 1}] * n)
    logger.info("warmed up batch sizes %s in %.1fs", sizes, time.perf_counter() - t0)
