"""CUDA graphs for the forward pass (``--cuda-graphs``): one graph per batch bucket, captured at
start-up and replayed for every batch of that size.

A small batch of a CNN on a fast GPU is bound by kernel launches, not by arithmetic: resnet50 in
float16 took 4.0 ms eager at batch 1 on an H100 and 4.9 ms at batch 32 (docs/benchmarks.md), the
CPU issuing a few hundred kernels one by one. A graph launches the whole recorded pass at once.
The worker already pads every batch up to a bucket on CUDA, so a handful of graphs covers every
batch it can run.

Each graph owns a static input (the batch is copied into it) and a static output (copied out, so
no answer is overwritten by the next replay). All graphs share one memory pool: they run one at a
time on one stream, so their scratch memory can overlap; capturing the largest first lets the
smaller ones fit inside what it reserved (vLLM captures its batch sizes the same way).

A batch with a shape or dtype no graph was captured for runs eagerly (logged once per shape): a
handler that pads differently still gets its answers. ``GraphedForward`` takes the capture step as
an argument, so its bookkeeping is tested on a CPU with a stand-in for the CUDA capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
# (forward, static input) -> (replay, static output): record forward on the static input once.
Capture = Callable[[Forward, torch.Tensor], tuple[Callable[[], Any], torch.Tensor]]
Signature = tuple[tuple[int, ...], torch.dtype, torch.device]

WARMUP_PASSES = 3  # eager passes on a side stream before capture (cuDNN/cuBLAS choose and allocate)


class CudaCapture:
    """The real capture step: warm-up passes on a side stream, then ``torch.cuda.graph`` into a
    memory pool that every graph made by this object shares (torch's documented recipe)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, forward: Forward, static_in: torch.Tensor) -> tuple[Callable[[], Any], torch.Tensor]:
        side = torch.cuda.Stream(device=static_in.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(static_in.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                forward(static_in)
        torch.cuda.current_stream(static_in.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = forward(static_in)
        return graph.replay, static_out


@dataclass
class _Graph:
    replay: Callable[[], Any]
    static_in: torch.Tensor
    static_out: torch.Tensor


def _signature(x: torch.Tensor) -> Signature:
    return (tuple(x.shape), x.dtype, x.device)


class GraphedForward:
    """``forward`` with a captured graph replayed for each batch shape it was captured for."""

    def __init__(self, forward: Forward, capture: Capture) -> None:
        self._forward = forward
        self._capture = capture
        self._graphs: dict[Signature, _Graph] = {}
        self._eager: set[Signature] = set()
        self.replays = 0

    def capture(self, example: torch.Tensor) -> None:
        """Record a graph for batches shaped like ``example`` (its values are only a sample)."""
        static_in = example.clone()  # the same strides (channels_last stays channels_last)
        replay, static_out = self._capture(self._forward, static_in)
        self._graphs[_signature(static_in)] = _Graph(replay, static_in, static_out)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(sig[0][0] for sig in self._graphs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sig = _signature(x)
        g = self._graphs.get(sig)
        if g is None:
            if sig not in self._eager:
                self._eager.add(sig)
                logger.warning("no CUDA graph for a batch of shape %s (%s): it runs eagerly", list(sig[0]), sig[1])
            return self._forward(x)
        g.static_in.copy_(x)
        g.replay()
        self.replays += 1
        return g.static_out.clone()


def use_cuda_graphs(
    handler: Any, sizes: Iterable[int], example: Callable[[int], torch.Tensor], capture: Capture | None = None
) -> GraphedForward:
    """Replace ``handler.forward`` by graphs captured for each batch size in ``sizes`` (largest
    first), on batches from ``example(n)``: what the handler's ``preprocess`` makes of ``n`` inputs."""
    t0 = time.perf_counter()
    graphed = GraphedForward(handler.forward, capture if capture is not None else CudaCapture())
    with torch.inference_mode():
        for n in sorted(set(sizes), reverse=True):
            graphed.capture(example(n))
    handler.forward = graphed
    logger.info("captured CUDA graphs for batch sizes %s in %.1fs", graphed.batch_sizes, time.perf_counter() - t0)
    return graphed
