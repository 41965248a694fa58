"""``--cuda-graphs``: one graph per batch bucket, replayed; eager for any other shape.

On a CPU the CUDA capture is replaced by a stand-in that records the same contract (a static
input, a static output that each replay overwrites), so the bookkeeping around it is tested here:
which batches replay, that each caller gets its own answer, that other shapes still run. The real
capture runs in the last test, on a machine with CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from common.config import Settings
from common.protocol import TensorData
from worker import main as worker_main
from worker.graphs import Forward, GraphedForward, use_cuda_graphs
from worker.handler import IMAGENET_SPEC, ModuleHandler
from worker.instances import START_FAILED


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    ).eval()


class StandIn:
    """Records ``forward`` on the static input; a replay recomputes it into the static output, as
    a CUDA graph rewrites its output memory."""

    def __init__(self) -> None:
        self.captured: list[tuple[int, ...]] = []

    def __call__(self, forward: Forward, static_in: torch.Tensor) -> tuple[Callable[[], Any], torch.Tensor]:
        self.captured.append(tuple(static_in.shape))
        static_out = forward(static_in).clone()

        def replay() -> None:
            static_out.copy_(forward(static_in))

        return replay, static_out


def _inputs(n: int, seed: int) -> list[TensorData]:
    g = torch.Generator().manual_seed(seed)
    pixels = [torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=g) for _ in range(n)]
    return [TensorData("uint8", (224, 224, 3), p.numpy().tobytes()) for p in pixels]


def _handler(device: str = "cpu", dtype: str = "float32") -> ModuleHandler:
    h = ModuleHandler(_net(), IMAGENET_SPEC, dtype=dtype)
    h.setup(torch.device(device))
    return h


def test_captured_sizes_replay_and_answer_like_the_eager_model() -> None:
    h = _handler()
    eager = h.forward
    stand_in = StandIn()
    graphed = use_cuda_graphs(h, [1, 2, 4], lambda n: h.preprocess(_inputs(n, 0)), capture=stand_in)
    assert stand_in.captured == [(4, 3, 224, 224), (2, 3, 224, 224), (1, 3, 224, 224)]  # largest first
    assert h.forward is graphed
    with torch.inference_mode():
        for n in (4, 2, 1):
            x = h.preprocess(_inputs(n, 10 + n))  # not the capture's sample: the replay must see these
            assert torch.allclose(h.forward(x), eager(x), atol=1e-5)
    assert graphed.replays == 3
    assert graphed.batch_sizes == [1, 2, 4]


def test_an_answer_is_not_overwritten_by_the_next_replay() -> None:
    h = _handler()
    graphed = GraphedForward(h.forward, StandIn())
    with torch.inference_mode():
        graphed.capture(h.preprocess(_inputs(2, 0)))
        a_in, b_in = h.preprocess(_inputs(2, 1)), h.preprocess(_inputs(2, 2))
        a = graphed(a_in)
        kept = a.clone()
        graphed(b_in)  # a replier thread may still be sending ``a`` while the next batch runs
    assert torch.equal(a, kept)


def test_a_batch_without_a_graph_runs_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    h = _handler()
    eager = h.forward
    graphed = GraphedForward(h.forward, StandIn())
    with torch.inference_mode():
        graphed.capture(h.preprocess(_inputs(2, 0)))
        three = h.preprocess(_inputs(3, 3))
        assert torch.allclose(graphed(three), eager(three), atol=1e-5)
        graphed(three)
        graphed(h.preprocess(_inputs(1, 4)))
    assert graphed.replays == 0
    assert sum("runs eagerly" in r.message for r in caplog.records) == 2  # once per shape, not per batch


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"device": "cpu"}, "needs a CUDA device"),
        ({"device": "cuda", "batch_buckets": "off"}, "needs --batch-buckets"),
        ({"device": "cuda", "compile": True}, "--compile"),
    ],
)
def test_the_worker_refuses_cuda_graphs_where_they_cannot_apply(
    overrides: dict[str, Any], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if overrides["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA: without it the device check comes first")
    settings = Settings(weights="random", model="resnet18", cuda_graphs=True, **overrides)
    with pytest.raises(SystemExit, match=why):
        worker_main.start(settings)  # before any model is loaded or Redis reached
    assert worker_main.run(settings) == START_FAILED  # the status --instances does not restart after
    assert why in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graphs_match_eager_on_the_gpu() -> None:
    h = _handler("cuda", "float16")
    eager = h.forward
    graphed = use_cuda_graphs(h, [1, 2, 4], lambda n: h.preprocess(_inputs(n, 0)))
    with torch.inference_mode():
        for n in (1, 2, 4, 2):
            x = h.preprocess(_inputs(n, 20 + n))
            torch.testing.assert_close(h.forward(x), eager(x), atol=1e-2, rtol=1e-2)
    assert graphed.replays == 4
