"""``redbatch worker``: load the model, register in Redis, serve until signalled."""

from __future__ import annotations

import logging

import torch

from common.config import Settings
from common.redisconn import connect
from worker.handler import TorchvisionClassifier
from worker.runner import BLOCK_S, Worker

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
    if settings.preprocess not in ("api", "worker"):
        raise SystemExit("--preprocess must be api or worker")
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    handler = TorchvisionClassifier(
        settings.model, settings.weights, settings.dtype, settings.channels_last, settings.preprocess == "worker"
    )
    handler.setup(device)
    _warm_up(handler)
    logger.info("loaded %s (%s weights) on %s", settings.model, handler.weights_source, device)
    worker = Worker(settings, handler, device, connect(settings, BLOCK_S))
    worker.install_signal_handlers()
    return worker.run()


def _warm_up(handler: TorchvisionClassifier) -> None:
    """One pass at batch 1 so the first request does not pay for lazy initialisation."""
    from common.protocol import TensorData

    blank = TensorData("uint8", handler.spec.shape, bytes(handler.spec.crop_size**2 * 3))
    with torch.inference_mode():
        handler.postprocess(handler.forward(handler.preprocess([blank])), [{"topk": 1}])
