"""The worker's execution options: BatchNorm folded into convolutions, and torch.compile."""

from __future__ import annotations

import pytest
import torch

from common.protocol import TensorData
from worker.handler import IMAGENET_SPEC, ModuleHandler, fuse_conv_bn


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    bn = net[1]
    with torch.no_grad():  # statistics that are not the identity, so folding has work to do
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return net.eval()


def _inputs(n: int) -> list[TensorData]:
    g = torch.Generator().manual_seed(1)
    pixels = [torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=g) for _ in range(n)]
    return [TensorData("uint8", (224, 224, 3), p.numpy().tobytes()) for p in pixels]


def test_folding_removes_batchnorm_and_keeps_the_answers() -> None:
    net = _net()
    x = torch.randn(4, 3, 64, 64)
    fused = fuse_conv_bn(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.inference_mode():
        assert torch.allclose(fused(x), net(x), atol=1e-5)


def test_a_model_fx_cannot_trace_runs_unfused() -> None:
    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) if x.sum() > 0 else -self.inner(x)  # control flow on values

    model = DataDependent().eval()
    assert fuse_conv_bn(model) is model


@pytest.mark.parametrize("compile_", [False, True])
def test_handler_options_give_the_eager_models_answers(compile_: bool) -> None:
    inputs = _inputs(3)
    plain = ModuleHandler(_net(), IMAGENET_SPEC)
    plain.fuse = False
    plain.setup(torch.device("cpu"))
    tuned = ModuleHandler(_net(), IMAGENET_SPEC)
    tuned.compile = compile_  # fuse stays on, the default
    tuned.setup(torch.device("cpu"))
    with torch.inference_mode():
        want = plain.forward(plain.preprocess(inputs))
        got = tuned.forward(tuned.preprocess(inputs))
    assert torch.allclose(got, want, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tuned.model.modules())
